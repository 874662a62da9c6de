// ClusterPublisher: the one ordered path from ingest to Redis.
//
// In cluster mode every line a relay reads goes to Redis as one call of the
// sequencing script, pipelined on one command connection, in the order the
// lines were read (issue 13, "One ordered path"). The relay numbers its lines
// 1, 2, 3, ...; the script's per-relay counter `P:n:<node>` drops a line that
// landed before and refuses one that comes after a line that did not land.
// That makes resending safe, so this type resends whenever in doubt, and keeps
// each line until Redis has answered for it:
//
//  * `published` or `duplicate`: the line is done (a duplicate landed before and
//    its reply was lost).
//  * `gap`: an earlier line did not land; the line is sent again, in order, in
//    the next round (below).
//  * A refusal while Redis cannot write (`OOM`, `BUSY`, `LOADING`, `MISCONF`,
//    ...): nothing was applied; the line is kept and sent again after a backoff.
//    `READONLY` means the connection reaches a replica (after a failover), so
//    the connection is dropped and made again.
//  * Any other error reply (a key of the wrong type, say): the line is logged,
//    counted and skipped, so that one bad key cannot wedge the relay.
//  * A lost connection: reconnect with backoff (100 ms doubling to 5 s), read
//    the new run_id, resend every line not yet done.
//
// Sending is organised in rounds. A round starts at the oldest line not done and
// sends lines in order as they come, up to a pipeline window, for as long as
// every reply is an acknowledgement. The first reply that is not ends the
// round: nothing more is sent, the replies still on the way are collected (the
// acknowledgements among them count), and then the next round starts from the
// oldest line not done, at once if the round made progress, else after a
// backoff. A lost connection ends the round without waiting; its replies are
// ignored, and the lines go again on the next connection.
//
// Every round begins with one small script call, "advance": in this server run,
// raise the relay's counter to (oldest line not done) - 1 if it is lower. This
// is what keeps a skipped line from leaving a permanent gap. A line refused
// with an error may or may not have consumed its counter (the sequencing script
// sets the counter before it touches the topic's keys, and Redis does not roll
// back a script that fails halfway), so the relay cannot know whether the next
// line will land or be answered `gap` forever. Every counter below the oldest
// line not done belongs to a line that is done, acknowledged (the counter holds
// it already) or skipped (consuming its number is then right), so raising the
// counter to that point never drops a line and never lets one land twice; a
// counter already higher (lines that landed with their replies lost) is left
// alone, and those lines come back `duplicate`. Renumbering the lines after a
// skip would instead lose the next line whenever the skipped one had in fact
// consumed its number.
//
// Backpressure: the queue is bounded in bytes (`--redis-queue-bytes`). A line is
// always taken (ingest has read it already), and once the queue holds the bound
// or more, `enqueue` tells ingest to stop reading emitters until the queue is
// down to half the bound. Lines are never dropped for want of room.
//
// Readiness (`/readyz`): ready when connected, when Redis answers (a command
// waiting longer than `stallTimeout` means not ready; an idle connection is
// pinged so that a hung Redis shows), and when Redis does not refuse writes.
//
// The publisher delivers nothing to local subscribers: the relay delivers only
// from its subscription connection, so that every relay sees one order.

import Logging
import NIOCore
import RESP

/// How a ``ClusterPublisher`` publishes: the relay's flags and a few tuning knobs.
public struct ClusterPublisherConfiguration: Sendable {
    /// The default bound on queued bytes (`--redis-queue-bytes`): 64 MiB.
    public static let defaultQueueBytes = 64 << 20
    /// The default prefix of every key and channel (`--redis-prefix`).
    public static let defaultPrefix = "progress-relay"
    /// The default lines per sequencing-script call (`--redis-lines-per-call`).
    public static let defaultLinesPerCall = 16

    /// The prefix `P` of every key and channel (`--redis-prefix`).
    public var prefix: String
    /// The relay's node name (`--node-name` with its per-process suffix), as in `P:n:<node>`.
    public var nodeName: String
    /// Events kept per topic (`--history`).
    public var history: Int
    /// Seconds a topic's keys live after a publish (`--topic-ttl`).
    public var topicTTLSeconds: Int
    /// Bytes of lines (and their topics) that may wait for Redis before ingest must stop reading.
    public var queueBytes: Int
    /// Script calls that may wait for replies at once.
    public var pipelineDepth: Int
    /// Bytes of lines that may wait for replies at once (one line may always go).
    public var maximumInFlightBytes: Int
    /// The first wait before a reconnect or a retry; it doubles up to ``maximumBackoff``.
    public var minimumBackoff: TimeAmount
    /// The longest wait before a reconnect or a retry.
    public var maximumBackoff: TimeAmount
    /// How long a command may wait for its reply before the publisher reports not ready.
    public var stallTimeout: TimeAmount
    /// How long a command may wait for its reply before the connection is dropped and made again
    /// (a connection left attached to a server that no longer answers).
    public var reconnectAfterStall: TimeAmount
    /// How long a TCP or Unix-socket connect may take.
    public var connectTimeout: TimeAmount
    /// Lines per script call (the batch script above 1): fewer calls cost Redis less per line.
    public var linesPerCall: Int

    /// A configuration with the relay's defaults for everything not given.
    public init(
        nodeName: String, prefix: String = ClusterPublisherConfiguration.defaultPrefix, history: Int,
        topicTTLSeconds: Int,
        queueBytes: Int = defaultQueueBytes
    ) {
        self.prefix = prefix
        self.nodeName = nodeName
        self.history = history
        self.topicTTLSeconds = topicTTLSeconds
        self.queueBytes = queueBytes
        self.pipelineDepth = 1024
        self.maximumInFlightBytes = 8 << 20
        self.minimumBackoff = .milliseconds(100)
        self.maximumBackoff = .seconds(5)
        self.stallTimeout = .seconds(1)
        self.reconnectAfterStall = .seconds(30)
        self.connectTimeout = .seconds(5)
        self.linesPerCall = Self.defaultLinesPerCall
    }
}

/// Whether the publisher can publish now (`/readyz`), and if not, why.
public enum PublisherReadiness: Sendable, Hashable, CustomStringConvertible {
    case ready
    case notReady(reason: String)

    public var isReady: Bool { self == .ready }

    public var description: String {
        switch self {
        case .ready: return "ready"
        case .notReady(let reason): return reason
        }
    }
}

/// What ingest must do after handing a line to ``ClusterPublisher/enqueue(topic:line:)``.
public enum PublisherEnqueueResult: Sendable {
    /// The line is queued; go on reading.
    case keepReading
    /// The line is queued, but the queue is full: stop reading emitters until the future
    /// succeeds (when the queue is down to half its bound, or when the publisher closes).
    case pause(until: EventLoopFuture<Void>)
    /// The publisher is flushing or closed: the line was not taken.
    case refused
}

/// What the publisher reports, for metrics and logs. Every closure is called on the publisher's
/// event loop and must be quick.
public struct ClusterPublisherHooks: Sendable {
    /// The bytes now queued (`progress_relay_redis_queue_bytes`), after every change.
    public var queueBytes: @Sendable (Int) -> Void
    /// Lines sent again (`progress_relay_redis_resent_total`), as an increment.
    public var resent: @Sendable (Int) -> Void
    /// A connection was made again after one was lost (`progress_relay_redis_reconnects_total`).
    public var reconnected: @Sendable () -> Void
    /// A line was skipped after an error reply: its topic and the error.
    public var skipped: @Sendable (_ topic: String, _ error: any Error) -> Void
    /// The round trip of a sampled script call, at most every 100 ms (`progress_relay_redis_rtt_seconds`).
    public var roundTrip: @Sendable (TimeAmount) -> Void
    /// Readiness changed (`progress_relay_redis_up`, `/readyz`).
    public var readiness: @Sendable (PublisherReadiness) -> Void
    /// A line was acknowledged: its counter, and whether it landed now or before.
    public var acknowledged: @Sendable (_ counter: UInt64, _ outcome: PublishOutcome) -> Void
    /// A connection was made (the first or a later one): ``ClusterPublisher/connectedSequencer`` is
    /// now set, for calls that waited for one.
    public var linked: @Sendable () -> Void

    /// Hooks that do nothing, to be replaced one by one.
    public init() {
        self.queueBytes = { _ in }
        self.resent = { _ in }
        self.reconnected = {}
        self.skipped = { _, _ in }
        self.roundTrip = { _ in }
        self.readiness = { _ in }
        self.acknowledged = { _, _ in }
        self.linked = {}
    }
}

/// Publishes the lines a relay reads, in order, exactly once each, through the sequencing script.
///
/// Create it on the event loop that ingest runs on, ``start()`` it, and hand it each accepted
/// line with ``enqueue(topic:line:)`` in the order the lines were read. It connects to Redis and
/// reconnects by itself. ``flush(deadline:)`` ends it.
public final class ClusterPublisher: Sendable {
    /// The event loop of ingest and of the Redis connection; ``enqueue(topic:line:)``,
    /// ``readiness`` and the queue properties must be used on it.
    public let eventLoop: any EventLoop
    /// Where Redis is.
    public let endpoint: RedisEndpoint
    /// How it publishes.
    public let configuration: ClusterPublisherConfiguration

    private let core: NIOLoopBoundBox<PublisherCore>

    /// Creates a publisher; it does nothing until ``start()``.
    public init(
        endpoint: RedisEndpoint, configuration: ClusterPublisherConfiguration, eventLoop: any EventLoop,
        logger: Logger, hooks: ClusterPublisherHooks = ClusterPublisherHooks()
    ) {
        precondition(
            configuration.history > 0 && configuration.topicTTLSeconds > 0 && configuration.queueBytes > 0
                && configuration.pipelineDepth > 0 && configuration.maximumInFlightBytes > 0,
            "history, ttl, queue bytes and pipeline bounds must be positive")
        self.eventLoop = eventLoop
        self.endpoint = endpoint
        self.configuration = configuration
        self.core = NIOLoopBoundBox.makeBoxSendingValue(
            PublisherCore(
                endpoint: endpoint, configuration: configuration, eventLoop: eventLoop, logger: logger, hooks: hooks),
            eventLoop: eventLoop)
    }

    /// Starts connecting to Redis. May be called from any thread; a second call does nothing.
    public func start() {
        let core = self.core
        self.eventLoop.execute { core.value.start() }
    }

    /// Queues `line` of `topic` for Redis, as the relay's next line. Call on ``eventLoop``, in the
    /// order the lines were read.
    ///
    /// - Returns: whether ingest may go on reading; see ``PublisherEnqueueResult``.
    public func enqueue(topic: String, line: ByteBuffer) -> PublisherEnqueueResult {
        self.core.value.enqueue(CollectionOfOne((topic, line)))
    }

    /// Queues lines read together, in order, and only then sends: so that they can share script
    /// calls (``ClusterPublisherConfiguration/linesPerCall``) instead of each leaving alone while
    /// the window has room. Call on ``eventLoop``.
    ///
    /// - Returns: whether ingest may go on reading, and how many lines were refused (the
    ///   publisher is stopping).
    public func enqueue<Lines: Sequence>(contentsOf lines: Lines) -> (result: PublisherEnqueueResult, refused: Int)
    where Lines.Element == (topic: String, line: ByteBuffer) {
        var refused = 0
        let result = self.core.value.enqueue(lines.lazy.map { ($0.topic, $0.line) }, refused: &refused)
        return (result, refused)
    }

    /// Whether the publisher can publish now, and if not, why. Call on ``eventLoop``; the
    /// ``ClusterPublisherHooks/readiness`` hook reports every change, for other threads.
    public var readiness: PublisherReadiness { self.core.value.readiness }

    /// Whether the publisher can publish now (`/readyz`). Call on ``eventLoop``.
    public var isReady: Bool { self.core.value.readiness.isReady }

    /// The sequencer of the current connection, nil while there is none. The relay sends its
    /// other commands (topic reads, TTL refreshes, the sweeper, probes) through it, so that Redis
    /// sees two connections per relay, and a read is ordered after the lines sent before it.
    /// Call on ``eventLoop``.
    public var connectedSequencer: TopicSequencer? { self.core.value.connectedSequencer }

    /// Bytes queued (lines not yet acknowledged, and their topics). Call on ``eventLoop``.
    public var queuedBytes: Int { self.core.value.queue.bytes }

    /// Lines not yet acknowledged. Call on ``eventLoop``.
    public var queuedLines: Int { self.core.value.queue.count }

    /// Stops taking lines and tries to get every queued line to Redis before `deadline`, then closes.
    /// May be called from any thread.
    ///
    /// - Returns: the number of lines that did not reach Redis (0 when all did).
    public func flush(deadline: NIODeadline) -> EventLoopFuture<Int> {
        let core = self.core
        return self.eventLoop.flatSubmit { core.value.flush(deadline: deadline) }
    }

    /// Closes at once, dropping whatever is queued. May be called from any thread.
    ///
    /// - Returns: the number of lines dropped.
    public func close() -> EventLoopFuture<Int> {
        let core = self.core
        return self.eventLoop.flatSubmit { core.value.shutdown() }
    }
}

/// The publisher's state and logic. Lives on the event loop.
final class PublisherCore {
    /// The script of a round's first call: in this server run, raise the relay's counter to
    /// ARGV[2] when it is lower (see the header).
    static let advanceScript = """
        local run, last = string.match(redis.call('GET', KEYS[1]) or '', '^(%w+) (%d+)$')
        if run ~= ARGV[1] or tonumber(last) < tonumber(ARGV[2]) then
          redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'EX', 604800)
          return 1
        end
        return 0
        """

    /// Error codes with which Redis refuses a command while it cannot write for now: nothing was
    /// applied, and the same command succeeds later.
    static let transientCodes = ["OOM", "BUSY", "LOADING", "MISCONF", "NOREPLICAS", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOSCRIPT"]

    let endpoint: RedisEndpoint
    let configuration: ClusterPublisherConfiguration
    let eventLoop: any EventLoop
    let logger: Logger
    let hooks: ClusterPublisherHooks
    let nodeKey: String

    var queue: PublishQueue

    private enum Link {
        case idle
        case connecting
        case connected(TopicSequencer)
        case waitingToReconnect(Scheduled<Void>)
        case closed
    }

    private enum RoundState {
        /// No connection.
        case idle
        /// Sending lines as they come.
        case running
        /// A reply was not an acknowledgement: sending nothing, collecting the replies on the way.
        case draining
        /// Every reply is in; the next round starts soon (after a backoff when scheduled).
        case waiting(Scheduled<Void>?)
    }

    private var link = Link.idle
    /// Bumped when a connection is made or dropped; replies from another one are ignored.
    private var generation: UInt64 = 0
    private var connectedBefore = false
    private var lastRunID: String?
    private var reconnectBackoff: TimeAmount

    private var round: UInt64 = 0
    private var roundState = RoundState.idle
    private var roundNeedsAdvance = false
    private var roundMadeProgress = false
    private var roundWantsBackoff = false
    /// Script calls sent in this round and not answered yet (the window is counted in calls: counted
    /// in lines, each answered one-line call would free room for exactly one line, and under load
    /// calls would never grow past one line).
    private var inFlight = 0
    private var inFlightBytes = 0
    private var pumping = false
    private var retryBackoff: TimeAmount
    /// After a batch was refused as a whole, lines up to this counter go one per call, so that
    /// the one Redis keeps refusing is found and skipped.
    private var singlesThrough: UInt64 = 0

    /// Commands of this connection waiting for replies (script calls, advance, pings).
    private var outstanding = 0
    /// When a reply last came, or when the first outstanding command was sent.
    private var lastActivity = NIODeadline.now()
    private var stalled = false
    /// Why Redis refused the last line, until a line is acknowledged.
    private var refusal: String?
    /// Why there is no usable connection, if there is none.
    private var linkProblem: String? = "not connected to Redis yet"
    private(set) var readiness = PublisherReadiness.notReady(reason: "not connected to Redis yet")
    private var timer: Scheduled<Void>?

    private var rttProbe: (counter: UInt64, sentAt: NIODeadline)?
    private var lastRoundTripReport = NIODeadline.distantPast

    private var pausePromise: EventLoopPromise<Void>?
    /// Set by flush: no more lines are taken.
    private var closing = false
    private var closed = false
    private var pendingFlush: (promise: EventLoopPromise<Int>, deadline: Scheduled<Void>)?

    init(
        endpoint: RedisEndpoint, configuration: ClusterPublisherConfiguration, eventLoop: any EventLoop,
        logger: Logger, hooks: ClusterPublisherHooks
    ) {
        self.endpoint = endpoint
        self.configuration = configuration
        self.eventLoop = eventLoop
        var logger = logger
        logger[metadataKey: "node"] = "\(configuration.nodeName)"
        self.logger = logger
        self.hooks = hooks
        self.nodeKey = configuration.prefix + ":n:" + configuration.nodeName
        self.queue = PublishQueue(limit: configuration.queueBytes)
        self.reconnectBackoff = configuration.minimumBackoff
        self.retryBackoff = configuration.minimumBackoff
    }

    var connectedSequencer: TopicSequencer? {
        if case .connected(let sequencer) = self.link { return sequencer }
        return nil
    }

    // MARK: - Ingest

    func start() {
        guard case .idle = self.link, !self.closed else { return }
        self.armTimer()
        self.connect()
    }

    func enqueue<Lines: Sequence>(_ lines: Lines) -> PublisherEnqueueResult where Lines.Element == (String, ByteBuffer) {
        var refused = 0
        return self.enqueue(lines, refused: &refused)
    }

    func enqueue<Lines: Sequence>(_ lines: Lines, refused: inout Int) -> PublisherEnqueueResult
    where Lines.Element == (String, ByteBuffer) {
        guard !self.closing else {
            refused = lines.reduce(0) { count, _ in count + 1 }
            return .refused
        }
        for (topic, line) in lines {
            _ = self.queue.append(topic: topic, line: line)
        }
        self.hooks.queueBytes(self.queue.bytes)
        self.pump()
        guard self.queue.isFull, !self.closed else { return .keepReading }
        if let promise = self.pausePromise {
            return .pause(until: promise.futureResult)
        }
        let promise = self.eventLoop.makePromise(of: Void.self)
        self.pausePromise = promise
        self.logger.debug("publish queue full: ingest pauses", metadata: ["bytes": "\(self.queue.bytes)"])
        return .pause(until: promise.futureResult)
    }

    private func resumeIngestIfRoom() {
        guard let promise = self.pausePromise, self.queue.hasRoom || self.closed else { return }
        self.pausePromise = nil
        promise.succeed(())
    }

    // MARK: - Connection

    private func connect() {
        guard !self.closed else { return }
        self.link = .connecting
        let configuration = self.configuration
        let depth = configuration.pipelineDepth
        // Room for the window, for the advance and pings, and for the SCRIPT LOAD and second
        // EVALSHA that each call adds after NOSCRIPT: the publisher's own bounds come first.
        RedisCommandConnection.connect(
            to: self.endpoint, on: self.eventLoop, logger: self.logger,
            maximumOutstandingCommands: 3 * depth + 64,
            maximumOutstandingBytes: 2 * configuration.maximumInFlightBytes + (16 << 20),
            connectTimeout: configuration.connectTimeout
        ).flatMap { connection in
            TopicSequencer.load(
                on: connection, prefix: configuration.prefix, nodeName: configuration.nodeName,
                history: configuration.history, ttlSeconds: configuration.topicTTLSeconds
            ).flatMapError { error in
                _ = connection.close()
                return connection.eventLoop.makeFailedFuture(error)
            }
        }.assumeIsolated().whenComplete { result in
            self.connectionAttemptEnded(result)
        }
    }

    private func connectionAttemptEnded(_ result: Result<TopicSequencer, any Error>) {
        guard case .connecting = self.link else {
            // Closed meanwhile.
            if case .success(let sequencer) = result { _ = sequencer.connection.close() }
            return
        }
        switch result {
        case .success(let sequencer):
            let connection = sequencer.connection
            self.generation += 1
            self.link = .connected(sequencer)
            if let previous = self.lastRunID, previous != connection.runID {
                self.logger.notice(
                    "Redis has a new run_id (restart or failover): topics start new epochs on their next event",
                    metadata: ["run_id": "\(connection.runID)", "previous_run_id": "\(previous)"])
            }
            self.lastRunID = connection.runID
            if self.connectedBefore {
                self.logger.info(
                    "reconnected to Redis", metadata: ["run_id": "\(connection.runID)", "queued_lines": "\(self.queue.count)"])
                self.hooks.reconnected()
            } else {
                self.logger.info("connected to Redis", metadata: ["endpoint": "\(self.endpoint)", "run_id": "\(connection.runID)"])
            }
            self.connectedBefore = true
            self.reconnectBackoff = self.configuration.minimumBackoff
            self.linkProblem = nil
            self.outstanding = 0
            self.stalled = false
            self.lastActivity = .now()
            let generation = self.generation
            connection.closeFuture.assumeIsolated().whenComplete { _ in
                self.connectionLost(generation: generation, reason: "the connection closed")
            }
            self.updateReadiness()
            self.startRound()
            self.hooks.linked()
        case .failure(let error):
            self.linkProblem = "cannot connect to Redis: \(error)"
            self.logger.warning(
                "cannot connect to Redis", metadata: ["error": "\(error)", "retry_in_ms": "\(self.reconnectBackoff.nanoseconds / 1_000_000)"])
            self.updateReadiness()
            self.scheduleReconnect()
        }
    }

    private func connectionLost(generation: UInt64, reason: String) {
        guard generation == self.generation, case .connected(let sequencer) = self.link else { return }
        self.logger.warning(
            "lost the Redis connection; lines wait and will be sent again",
            metadata: ["reason": "\(reason)", "queued_lines": "\(self.queue.count)"])
        // Invalidate first: closing fails the replies still waiting, and those are not news.
        self.generation += 1
        self.endRoundAtOnce()
        self.outstanding = 0
        self.stalled = false
        self.linkProblem = "Redis connection lost (\(reason)); reconnecting"
        self.link = .idle
        _ = sequencer.connection.close()
        self.updateReadiness()
        self.scheduleReconnect()
    }

    private func scheduleReconnect() {
        guard !self.closed else { return }
        let delay = self.reconnectBackoff
        self.reconnectBackoff = min(delay * 2, self.configuration.maximumBackoff)
        let task = self.eventLoop.assumeIsolated().scheduleTask(in: delay) {
            self.connect()
        }
        self.link = .waitingToReconnect(task)
    }

    // MARK: - Rounds

    private func startRound() {
        guard case .connected = self.link else { return }
        self.round += 1
        self.roundState = .running
        self.roundNeedsAdvance = true
        self.roundMadeProgress = false
        self.roundWantsBackoff = false
        self.inFlight = 0
        self.inFlightBytes = 0
        self.rttProbe = nil
        self.queue.rewind()
        self.pump()
    }

    /// Ends the current round without waiting for its replies (they will be ignored).
    private func endRoundAtOnce() {
        if case .waiting(let task?) = self.roundState { task.cancel() }
        self.round += 1
        self.roundState = .idle
        self.inFlight = 0
        self.inFlightBytes = 0
        self.rttProbe = nil
    }

    /// Stops sending in this round; the next starts when its replies are in.
    private func breakRound(backoff: Bool) {
        if case .running = self.roundState { self.roundState = .draining }
        if backoff { self.roundWantsBackoff = true }
        self.rttProbe = nil
    }

    private func roundReplyHandled() {
        switch self.roundState {
        case .draining where self.inFlight == 0:
            self.scheduleNextRound()
        case .running:
            self.pump()
        default:
            break
        }
    }

    private func scheduleNextRound() {
        let round = self.round
        if self.roundWantsBackoff || !self.roundMadeProgress {
            let delay = self.retryBackoff
            self.retryBackoff = min(delay * 2, self.configuration.maximumBackoff)
            let task = self.eventLoop.assumeIsolated().scheduleTask(in: delay) {
                guard self.round == round, case .waiting = self.roundState else { return }
                self.startRound()
            }
            self.roundState = .waiting(task)
        } else {
            self.roundState = .waiting(nil)
            self.eventLoop.assumeIsolated().execute {
                guard self.round == round, case .waiting = self.roundState else { return }
                self.startRound()
            }
        }
    }

    /// Sends lines of the current round while the window has room.
    private func pump() {
        guard !self.pumping, case .connected(let sequencer) = self.link, case .running = self.roundState else { return }
        self.pumping = true
        defer { self.pumping = false }
        let round = self.round
        let generation = self.generation
        var resent = 0
        defer { if resent > 0 { self.hooks.resent(resent) } }
        while self.round == round, case .running = self.roundState,
            self.inFlight < self.configuration.pipelineDepth,
            self.inFlight == 0 || self.inFlightBytes < self.configuration.maximumInFlightBytes,
            self.queue.hasUnsent, let first = self.queue.oldestUnacknowledged
        {
            if self.roundNeedsAdvance {
                self.roundNeedsAdvance = false
                self.sendAdvance(to: first - 1, sequencer: sequencer, round: round, generation: generation)
                continue
            }
            guard let (line, resend) = self.queue.nextToSend() else { break }
            if resend { resent += 1 }
            var lines = [line]
            let limit = line.counter <= self.singlesThrough ? 1 : self.configuration.linesPerCall
            var bytes = line.bytes
            while lines.count < limit, self.inFlightBytes + bytes < self.configuration.maximumInFlightBytes,
                let (next, again) = self.queue.nextToSend()
            {
                if again { resent += 1 }
                lines.append(next)
                bytes += next.bytes
            }
            self.inFlight += 1
            self.inFlightBytes += bytes
            self.noteSent()
            if self.rttProbe == nil, self.lastActivity - self.lastRoundTripReport >= .milliseconds(100) {
                self.rttProbe = (line.counter, .now())
            }
            if lines.count > 1 {
                let batch = lines.map { BatchLine(topic: $0.topic, line: $0.line, counter: $0.counter) }
                sequencer.publishBatch(batch, firstUnacknowledged: first).assumeIsolated().whenComplete { result in
                    self.callAnswered(lines, bytes: bytes, round: round, generation: generation, result: result)
                }
                continue
            }
            sequencer.publish(topic: line.topic, line: line.line, counter: line.counter, firstUnacknowledged: first)
                .map { [$0] }
                .assumeIsolated().whenComplete { result in
                    self.callAnswered(lines, bytes: bytes, round: round, generation: generation, result: result)
                }
        }
    }

    /// The reply of one script call, of one line or a batch: each line's outcome in order. An error
    /// is for the call as a whole. A refusal of another kind than "cannot write now" skips a lone
    /// line, and sends a batch's lines again one per call, to find the line to skip.
    private func callAnswered(
        _ lines: [PendingLine], bytes: Int, round: UInt64, generation: UInt64,
        result: Result<[PublishOutcome], any Error>
    ) {
        self.noteReply(generation: generation)
        guard round == self.round else { return }
        self.inFlight -= 1
        self.inFlightBytes -= bytes
        switch result {
        case .success(let outcomes):
            for (line, outcome) in zip(lines, outcomes) {
                switch outcome {
                case .published, .duplicate:
                    self.acknowledged(line.counter, outcome)
                case .gap:
                    // An earlier line did not land (its own reply said why): send again from the oldest.
                    self.breakRound(backoff: false)
                }
            }
        case .failure(let error):
            switch Self.classify(error) {
            case .connectionLost(let reason), .wrongServer(let reason):
                self.connectionLost(generation: generation, reason: reason)
                return
            case .refused(let reason):
                self.refused(reason)
            case .rejected:
                if lines.count == 1 {
                    self.skip(lines[0].counter, error: error)
                } else {
                    self.singlesThrough = max(self.singlesThrough, lines.last!.counter)
                }
                self.breakRound(backoff: false)
            }
        }
        self.roundReplyHandled()
    }

    private func sendAdvance(to counter: UInt64, sequencer: TopicSequencer, round: UInt64, generation: UInt64) {
        self.inFlight += 1
        self.noteSent()
        let key = self.nodeKey
        let runID = sequencer.runID
        sequencer.connection.send { buffer in
            RESPCommand.encode("EVAL", Self.advanceScript, 1, key, runID, counter, into: &buffer)
        }.assumeIsolated().whenComplete { result in
            self.noteReply(generation: generation)
            guard round == self.round else { return }
            self.inFlight -= 1
            if case .failure(let error) = result {
                switch Self.classify(error) {
                case .connectionLost(let reason), .wrongServer(let reason):
                    self.connectionLost(generation: generation, reason: reason)
                    return
                case .refused(let reason):
                    self.refused(reason)
                case .rejected:
                    // Not fatal: if the counter is behind, the lines answer `gap` and the next
                    // round, after a backoff, tries again.
                    self.logger.warning("Redis refused to advance the relay's counter", metadata: ["error": "\(error)"])
                }
            }
            self.roundReplyHandled()
        }
    }

    private func acknowledged(_ counter: UInt64, _ outcome: PublishOutcome) {
        guard self.queue.markDone(counter) else { return }
        self.roundMadeProgress = true
        self.retryBackoff = self.configuration.minimumBackoff
        if self.refusal != nil {
            self.refusal = nil
            self.updateReadiness()
        }
        if let probe = self.rttProbe, probe.counter == counter {
            self.rttProbe = nil
            self.lastRoundTripReport = self.lastActivity
            self.hooks.roundTrip(self.lastActivity - probe.sentAt)
        }
        self.hooks.acknowledged(counter, outcome)
        self.lineLeft()
    }

    private func refused(_ reason: String) {
        if self.refusal == nil {
            self.logger.warning("Redis refuses writes; lines wait and will be sent again", metadata: ["reply": "\(reason)"])
        }
        self.refusal = reason
        self.updateReadiness()
        self.breakRound(backoff: true)
    }

    private func skip(_ counter: UInt64, error: any Error) {
        guard let line = self.queue.line(counter), self.queue.markDone(counter) else { return }
        self.logger.error(
            "Redis refused a line; it is skipped",
            metadata: ["topic": "\(line.topic)", "line_number": "\(counter)", "error": "\(error)"])
        self.roundMadeProgress = true
        self.hooks.skipped(line.topic, error)
        self.lineLeft()
    }

    /// After a line was acknowledged or skipped.
    private func lineLeft() {
        self.hooks.queueBytes(self.queue.bytes)
        self.resumeIngestIfRoom()
        if self.pendingFlush != nil, self.queue.isEmpty {
            self.finishFlush()
        }
    }

    // MARK: - Failures

    enum FailureKind: Equatable {
        /// The connection is gone: reconnect and resend.
        case connectionLost(String)
        /// The server is a replica (`READONLY`): reconnect, so that the address leads to the primary.
        case wrongServer(String)
        /// Redis cannot write for now, nothing was applied: retry after a backoff.
        case refused(String)
        /// Redis refused this command for a reason of its own: skip the line.
        case rejected
    }

    static func classify(_ error: any Error) -> FailureKind {
        switch error {
        case let error as RedisReplyError:
            if Self.mentions(error, code: "READONLY") { return .wrongServer(error.message) }
            if Self.transientCodes.contains(where: { Self.mentions(error, code: $0) }) { return .refused(error.message) }
            return .rejected
        case let error as RedisConnectionError:
            // A bound of the connection (not sent) is a reason to wait, not to drop the line.
            return error.isConnectionLost ? .connectionLost(error.description) : .refused(error.description)
        case is SequencerError:
            return .rejected
        default:
            return .connectionLost("\(error)")
        }
    }

    /// Whether the reply carries `code`: as its own code, or (Redis 6.2 wraps errors raised inside
    /// a script in `ERR Error running script ...`) as `-CODE ` inside the message.
    private static func mentions(_ error: RedisReplyError, code: String) -> Bool {
        error.code == code || error.message.contains("-" + code + " ")
    }

    // MARK: - Liveness and readiness

    private func noteSent() {
        self.outstanding += 1
        if self.outstanding == 1 { self.lastActivity = .now() }
    }

    private func noteReply(generation: UInt64) {
        guard generation == self.generation else { return }
        self.outstanding -= 1
        self.lastActivity = .now()
        if self.stalled {
            self.stalled = false
            self.logger.info("Redis answers again")
            self.updateReadiness()
        }
    }

    private func armTimer() {
        let interval = TimeAmount.nanoseconds(max(self.configuration.stallTimeout.nanoseconds / 4, 10_000_000))
        self.timer = self.eventLoop.assumeIsolated().scheduleTask(in: interval) {
            self.tick()
            self.armTimer()
        }
    }

    /// Notices a Redis that does not answer, and pings an idle connection so that it would notice.
    private func tick() {
        guard case .connected(let sequencer) = self.link else { return }
        let now = NIODeadline.now()
        let waited = now - self.lastActivity
        if self.outstanding > 0 {
            if waited > self.configuration.stallTimeout, !self.stalled {
                self.stalled = true
                self.logger.warning(
                    "Redis does not answer", metadata: ["waited_ms": "\(waited.nanoseconds / 1_000_000)", "outstanding": "\(self.outstanding)"])
                self.updateReadiness()
            }
            if waited > self.configuration.reconnectAfterStall {
                self.connectionLost(generation: self.generation, reason: "no reply for \(waited.nanoseconds / 1_000_000) ms")
            }
        } else if waited.nanoseconds >= self.configuration.stallTimeout.nanoseconds / 2 {
            let generation = self.generation
            self.noteSent()
            sequencer.connection.send("PING").assumeIsolated().whenComplete { _ in
                self.noteReply(generation: generation)
            }
        }
    }

    private func updateReadiness() {
        let readiness: PublisherReadiness
        if self.closed {
            readiness = .notReady(reason: "the publisher is closed")
        } else if let problem = self.linkProblem {
            readiness = .notReady(reason: problem)
        } else if self.stalled {
            readiness = .notReady(
                reason: "Redis has not answered for more than \(self.configuration.stallTimeout.nanoseconds / 1_000_000) ms")
        } else if let refusal = self.refusal {
            readiness = .notReady(reason: "Redis refuses writes: \(refusal)")
        } else {
            readiness = .ready
        }
        guard readiness != self.readiness else { return }
        self.readiness = readiness
        self.hooks.readiness(readiness)
    }

    // MARK: - Shutdown

    func flush(deadline: NIODeadline) -> EventLoopFuture<Int> {
        if self.closed { return self.eventLoop.makeSucceededFuture(0) }
        if let pending = self.pendingFlush { return pending.promise.futureResult }
        self.closing = true
        if self.queue.isEmpty { return self.shutdown() }
        let promise = self.eventLoop.makePromise(of: Int.self)
        let task = self.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            self.finishFlush()
        }
        self.pendingFlush = (promise, task)
        return promise.futureResult
    }

    private func finishFlush() {
        guard let pending = self.pendingFlush else { return }
        self.pendingFlush = nil
        pending.deadline.cancel()
        let left = self.queue.count
        if left > 0 {
            self.logger.warning("shutdown: lines did not reach Redis in time", metadata: ["lines": "\(left)"])
        }
        self.shutdown().whenComplete { _ in pending.promise.succeed(left) }
    }

    /// Closes: no more lines, no reconnects; queued lines are dropped. Returns how many.
    func shutdown() -> EventLoopFuture<Int> {
        guard !self.closed else { return self.eventLoop.makeSucceededFuture(0) }
        self.closed = true
        self.closing = true
        self.timer?.cancel()
        self.timer = nil
        var closedConnection = self.eventLoop.makeSucceededVoidFuture()
        switch self.link {
        case .connected(let sequencer):
            self.generation += 1
            closedConnection = sequencer.connection.close()
        case .waitingToReconnect(let task):
            task.cancel()
        case .idle, .connecting, .closed:
            break
        }
        self.link = .closed
        self.endRoundAtOnce()
        let dropped = self.queue.removeAll()
        self.hooks.queueBytes(0)
        self.resumeIngestIfRoom()
        if let pending = self.pendingFlush {
            self.pendingFlush = nil
            pending.deadline.cancel()
            pending.promise.succeed(dropped)
        }
        self.updateReadiness()
        return closedConnection.map { dropped }.recover { _ in dropped }
    }
}
