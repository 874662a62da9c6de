// ProgressEmitter: progress events from a Swift worker to the relay, never in the way.
//
// `emit` only encodes the line and appends it to a bounded in-memory queue;
// one background thread writes the queue to the relay's Unix socket. When the
// relay is down or restarting, lines wait in the queue (the oldest is dropped
// when it is full, and counted) while the thread reconnects with backoff. A
// line whose write failed is resent whole, with everything after it, on a new
// connection: the relay drops a partial line, so nothing is published twice
// or cut. Foundation and the C library only.

import Foundation

public final class ProgressEmitter: Sendable {
    /// How the emitter buffers and reconnects.
    public struct Configuration: Sendable {
        /// The relay's ingest socket: `PROGRESS_RELAY_SOCKET`, else `/run/progress.sock`.
        public var socketPath: String
        /// Lines kept while the relay cannot take them; beyond it the oldest is dropped.
        public var queueCapacity: Int
        /// The longest wait between two connection attempts.
        public var maximumBackoff: Duration

        public init(
            socketPath: String = RelaySocket.defaultPath, queueCapacity: Int = 10_000,
            maximumBackoff: Duration = .seconds(2)
        ) {
            self.socketPath = socketPath
            self.queueCapacity = max(1, queueCapacity)
            self.maximumBackoff = maximumBackoff
        }
    }

    public let configuration: Configuration
    private let queue: LineQueue

    public convenience init(socketPath: String = RelaySocket.defaultPath, queueCapacity: Int = 10_000) {
        self.init(configuration: Configuration(socketPath: socketPath, queueCapacity: queueCapacity))
    }

    public init(configuration: Configuration) {
        self.configuration = configuration
        queue = LineQueue(capacity: configuration.queueCapacity)
        let queue = self.queue
        let writer = Thread { LineWriter(queue: queue, configuration: configuration).run() }
        writer.name = "progress-emitter"
        writer.start()
    }

    deinit {
        queue.close()
    }

    // MARK: Emitting

    /// Sends one event: `fields` must encode as a JSON object; its members follow `topic` and `type`.
    /// Never throws and never waits for the relay; a value that cannot be encoded is counted in `failedCount`.
    public func emit(topic: String, type: String? = nil, fields: some Encodable) {
        guard let line = EventEncoding.line(topic: topic, type: type, fields: fields) else {
            queue.countFailure()
            return
        }
        queue.append(line)
    }

    /// Sends one event built from a dictionary of encodable values.
    public func emit(topic: String, type: String? = nil, fields: [String: any Encodable & Sendable] = [:]) {
        emit(topic: topic, type: type, fields: EncodableDictionary(values: fields))
    }

    /// A helper that writes the contract's `progress`, `complete` and `error` events to one topic.
    public func task(topic: String) -> TaskProgress {
        TaskProgress(topic: topic, emitter: self)
    }

    // MARK: Ending

    /// Waits until every queued line was written to the relay, or until `timeout`; true when all were.
    @discardableResult
    public func flush(timeout: Duration = .seconds(5)) -> Bool {
        queue.waitUntilDrained(timeout: timeout)
    }

    /// Flushes, then stops the background writer. Later events are dropped and counted.
    public func close(timeout: Duration = .seconds(5)) {
        flush(timeout: timeout)
        queue.close()
    }

    // MARK: Counters

    /// Events dropped because the queue was full (the oldest go first), or emitted after `close`.
    public var droppedCount: Int { queue.counters.dropped }
    /// Events whose fields could not be encoded as a JSON object.
    public var failedCount: Int { queue.counters.failed }
    /// Lines the relay answered as rejected (see the relay's log for each reason).
    public var rejectedCount: Int { queue.counters.rejected }
    /// Lines written to the relay.
    public var writtenCount: Int { queue.counters.written }
}

/// The contract's progress events for one topic, as progress pages expect them.
///
/// The defaults match the Python client's: `status` "PROGRESS", `message` "current/total",
/// `progress` a percentage with one decimal, `complete`'s `message` "done".
public struct TaskProgress: Sendable {
    public let topic: String
    public let emitter: ProgressEmitter

    /// `progress` (0 to 100, from `current` and `total`), `current`, `total`, `message`, `status`.
    public func progress(current: Int, total: Int, message: String? = nil, status: String = "PROGRESS") {
        let percent = total > 0 ? min(100, max(0, (Double(current) * 1000 / Double(total)).rounded() / 10)) : 0
        emitter.emit(
            topic: topic, type: "progress",
            fields: [
                "progress": percent, "current": current, "total": total,
                "message": message ?? "\(current)/\(total)", "status": status,
            ])
    }

    /// `complete` with `success: true`, and the task's result when it has one.
    public func complete(result: (any Encodable & Sendable)? = nil, message: String = "done") {
        var fields: [String: any Encodable & Sendable] = ["success": true, "message": message]
        if let result { fields["result"] = result }
        emitter.emit(topic: topic, type: "complete", fields: fields)
    }

    /// `error` with what went wrong.
    public func fail(error: String, details: (any Encodable & Sendable)? = nil) {
        var fields: [String: any Encodable & Sendable] = ["error": error]
        if let details { fields["details"] = details }
        emitter.emit(topic: topic, type: "error", fields: fields)
    }

    /// `error` from a thrown error: "TypeName: description", and the type in `details`.
    public func fail(_ error: any Error) {
        let typeName = String(describing: Swift.type(of: error))
        fail(error: "\(typeName): \(error)", details: ["type": typeName])
    }
}
