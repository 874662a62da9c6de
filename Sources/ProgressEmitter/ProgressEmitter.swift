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

/// Sends progress events from a Swift worker to a `progress-relay`, without ever holding the worker up.
///
/// Make one emitter per process and share it (it is `Sendable`): each one owns a background
/// thread and one connection to the relay's ingest socket. `emit` encodes the event and queues
/// it; the thread writes the queue to the relay. While the relay is down or
/// restarting, events wait in a bounded queue (the oldest are dropped when it is full) and the
/// thread reconnects with backoff, so a worker never fails or waits because of the relay.
///
/// Nothing here throws: what did not reach the relay is counted instead (``droppedCount``,
/// ``failedCount``, ``rejectedCount``). Call ``close(timeout:)`` before the process exits, or
/// ``flush(timeout:)`` at a point where the events must have been sent; lines still queued when
/// the emitter is released are lost.
///
/// For one task's `progress`, `complete` and `error` events, ``task(topic:)`` gives a
/// ``TaskProgress`` that writes them in the contract's shape.
public final class ProgressEmitter: Sendable {
    /// How the emitter buffers and reconnects.
    public struct Configuration: Sendable {
        /// The relay's ingest socket: `PROGRESS_RELAY_SOCKET`, else `/run/progress.sock`
        /// (``RelaySocket/defaultPath``).
        public var socketPath: String
        /// Lines kept while the relay cannot take them; beyond it the oldest is dropped.
        public var queueCapacity: Int
        /// The longest wait between two connection attempts.
        public var maximumBackoff: Duration

        /// The default of ``queueCapacity``.
        public static let defaultQueueCapacity = 10_000

        /// - Parameters:
        ///   - socketPath: The relay's ingest socket.
        ///   - queueCapacity: Lines kept while the relay cannot take them; at least 1.
        ///   - maximumBackoff: The longest wait between two connection attempts (they start 50 ms apart and double).
        public init(
            socketPath: String = RelaySocket.defaultPath, queueCapacity: Int = Configuration.defaultQueueCapacity,
            maximumBackoff: Duration = .seconds(2)
        ) {
            self.socketPath = socketPath
            self.queueCapacity = max(1, queueCapacity)
            self.maximumBackoff = maximumBackoff
        }
    }

    /// The settings the emitter was made with.
    public let configuration: Configuration
    private let queue: LineQueue

    /// Makes an emitter and starts its writer thread; the first connection is made when the first
    /// event is queued, so the relay need not be running yet.
    ///
    /// - Parameters:
    ///   - socketPath: The relay's ingest socket.
    ///   - queueCapacity: Lines kept while the relay cannot take them; beyond it the oldest is dropped.
    public convenience init(
        socketPath: String = RelaySocket.defaultPath, queueCapacity: Int = Configuration.defaultQueueCapacity
    ) {
        self.init(configuration: Configuration(socketPath: socketPath, queueCapacity: queueCapacity))
    }

    /// Makes an emitter with every setting of ``Configuration`` and starts its writer thread.
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

    /// Queues one event for the relay: a line `{"topic":…,"type":…,<fields>}`.
    ///
    /// Never throws and never waits for the relay. Fields that do not encode as a JSON object are
    /// counted in ``failedCount``; a line the relay refuses (an invalid topic, or a `topic` or
    /// `type` key among `fields`) is counted in ``rejectedCount``.
    ///
    /// - Parameters:
    ///   - topic: The topic subscribers follow (1 to 256 of `A-Z a-z 0-9 _ - . : / @ =`).
    ///   - type: The event's type, such as `progress`, `complete` or `error`; left out when nil.
    ///   - fields: Any value that encodes as a JSON object; its members follow `topic` and `type`.
    public func emit(topic: String, type: String? = nil, fields: some Encodable) {
        guard let line = EventEncoding.line(topic: topic, type: type, fields: fields) else {
            queue.countFailure()
            return
        }
        queue.append(line)
    }

    /// Queues one event built from a dictionary of encodable values, as
    /// `emit(topic:type:fields:)` with `some Encodable` does; keys are written in sorted order.
    public func emit(topic: String, type: String? = nil, fields: [String: any Encodable & Sendable] = [:]) {
        emit(topic: topic, type: type, fields: EncodableDictionary(values: fields))
    }

    /// A ``TaskProgress`` that writes the contract's `progress`, `complete` and `error` events to `topic`.
    public func task(topic: String) -> TaskProgress {
        TaskProgress(topic: topic, emitter: self)
    }

    // MARK: Ending

    /// Waits until every queued line was written to the relay, or until `timeout`.
    ///
    /// Use it where events must have left the process, before a fork or at the end of a job.
    /// Written means handed to the relay's socket; the relay may still refuse a line (``rejectedCount``).
    ///
    /// - Returns: true when the queue was emptied in time; false on timeout, or when the emitter was closed meanwhile.
    @discardableResult
    public func flush(timeout: Duration = .seconds(5)) -> Bool {
        queue.waitUntilDrained(timeout: timeout)
    }

    /// Flushes for up to `timeout`, then stops the background writer. Later events are dropped and
    /// counted in ``droppedCount``. Call it once, before the process exits.
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
/// Get one from ``ProgressEmitter/task(topic:)``. The defaults match the Python client's: `status`
/// "PROGRESS", `message` "current/total", `progress` a percentage with one decimal, `complete`'s
/// `message` "done". Like `ProgressEmitter.emit`, nothing here throws or waits.
public struct TaskProgress: Sendable {
    /// The topic every event of this task goes to.
    public let topic: String
    /// The emitter that queues the events.
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
