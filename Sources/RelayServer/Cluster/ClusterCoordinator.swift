// ClusterCoordinator: cluster mode on the hub's loop, between Redis and the hub.
//
// In cluster mode (`--redis`) Redis numbers every event and each relay learns
// the numbering from its subscription connection. This type carries that out:
//
//  * ingest: every accepted line goes to the publisher (one ordered path to the
//    sequencing script); a full queue stops the emitters' reads.
//  * exact subscriptions: the first local subscriber of a topic joins it
//    (`TopicFollower`: SUBSCRIBE, read, merge), and a subscribe is answered from
//    the hub's ring only once the follower knows where the topic stands. A
//    `since` ahead of the ring waits for it (at most 2 s, then a read). The last
//    subscriber leaving starts the 30 s linger; then the topic is unsubscribed
//    and the hub forgets it.
//  * messages: each one goes through the follower, whose actions (publish to
//    the hub, read, reset) are carried out here in order. Their fan-out plans
//    are merged and sent once per turn of the loop, so that a burst of
//    messages costs one hop per subscriber loop, not one per message.
//  * patterns: PSUBSCRIBE `P:t:<prefix>*`, a snapshot of the matching topics'
//    newest events from the index, and delivery of matching topics nobody
//    here follows exactly. Those have no ring worth resuming from, so a gap in
//    one is not repaired: the pattern subscriber is sent the newest event, as a
//    snapshot would (patterns have no resume; see docs/cluster.md).
//  * the subscription connection: connect, resubscribe everything in batches of
//    512, re-read every followed topic, reconnect with backoff (100 ms to 5 s).
//  * upkeep: the follower's clock, TTL refresh of watched topics every TTL/3,
//    the index sweeper (one relay at a time), readiness for `/readyz`.
//
// Everything here runs on the hub's loop: the hub, the follower and both Redis
// connections live there, so nothing takes a lock and the follower's one rule
// ("a read is sent after every message handed to it before") holds by FIFO.

import Logging
import NIOCore
import RelayCluster
import RelayHub

/// Cluster mode's settings (`--redis`, `--redis-prefix`, `--redis-queue-bytes`, `--redis-lines-per-call`,
/// `--node-name`).
public struct ClusterSettings: Sendable {
    public var endpoint: RedisEndpoint
    /// The prefix `P` of every key and channel.
    public var prefix: String
    /// Ingest bytes that may wait for Redis before emitters are held back.
    public var queueBytes: Int
    /// Emitted lines per sequencing-script call (1 to 64).
    public var linesPerCall: Int
    /// This process's node name, unique per process (the CLI adds a random suffix).
    public var nodeName: String

    public init(
        endpoint: RedisEndpoint, prefix: String, queueBytes: Int,
        linesPerCall: Int = ClusterPublisherConfiguration.defaultLinesPerCall, nodeName: String
    ) {
        self.endpoint = endpoint
        self.prefix = prefix
        self.queueBytes = queueBytes
        self.linesPerCall = linesPerCall
        self.nodeName = nodeName
    }
}

/// What the hub driver hands the coordinator when it makes it.
struct ClusterSetup: Sendable {
    var settings: ClusterSettings
    /// `--history`, the count of every read and the streams' MAXLEN.
    var history: Int
    /// `--topic-ttl` in seconds.
    var topicTTLSeconds: Int
    var metrics: ClusterMetrics
    var logger: Logger
}

final class ClusterCoordinator {
    /// A subscribe waiting for Redis: for its topic's join, a catch-up, or a pattern snapshot.
    private struct PendingSubscribe {
        let id: SubscriberID
        let name: String
        let resume: ResumePoint?
    }

    private struct PatternState {
        var members = Set<SubscriberID>()
        /// Redis confirmed the PSUBSCRIBE on the current subscription connection.
        var confirmed = false
        var snapshotInFlight = false
        /// Subscribes to answer with the next snapshot.
        var waiting: [PendingSubscribe] = []
    }

    private struct QueuedRead {
        let topic: String
        let count: Int
        let token: TopicFollower.ReadToken
    }

    private enum Link {
        case idle
        case connecting
        case connected(RedisSubscriptionConnection)
        case waiting
        case stopped
    }

    /// Reads in flight at once on the command connection (its own bound is 4,096 commands, shared
    /// with the publisher's pipeline).
    private static let maximumReadsInFlight = 256
    private static let tickInterval: TimeAmount = .milliseconds(100)

    private let loop: any EventLoop
    private let hub: Hub
    private let outlet: SubscriberLoops
    private let setup: ClusterSetup
    private let logger: Logger
    private let metrics: ClusterMetrics
    let publisher: ClusterPublisher
    /// How callbacks (which must be `Sendable`) reach this object; emptied at stop.
    private let cell: NIOLoopBoundBox<ClusterCoordinator?>

    private var follower: TopicFollower
    /// Local subscribers of each followed topic, answered or still waiting.
    private var members: [String: Set<SubscriberID>] = [:]
    /// Subscribes waiting for their topic's position (join, or a read after the hub forgot it).
    private var waitingForJoin: [String: [PendingSubscribe]] = [:]
    /// Subscribes waiting for the ring to catch up with their `since`, by waiter number.
    private var catchingUp: [UInt64: PendingSubscribe] = [:]
    private var nextWaiter: UInt64 = 0
    private var patterns: [String: PatternState] = [:]

    private var readQueue: [QueuedRead] = []
    private var readQueueHead = 0
    private var readsInFlight = 0

    private var link = Link.idle
    private var linkGeneration: UInt64 = 0
    /// Every channel and pattern was confirmed on the current connection.
    private var linkSynced = false
    private var linkedBefore = false
    private var linkBackoff: TimeAmount = .milliseconds(100)
    /// Topics whose channel the follower wants subscribed.
    private var channels = Set<String>()

    /// Fan-out of the messages handled in this turn of the loop, sent together (empty: none).
    private var pendingLoops: [LoopPlan] = []
    private var pendingDeliveries = 0
    private var timers: [RepeatedTask] = []
    private var refreshing = false
    private var sweeping = false
    private var badMessagesLogged = 0
    private let allocator = ByteBufferAllocator()

    private init(
        loop: any EventLoop, hub: Hub, outlet: SubscriberLoops, setup: ClusterSetup, publisher: ClusterPublisher,
        cell: NIOLoopBoundBox<ClusterCoordinator?>
    ) {
        self.loop = loop
        self.hub = hub
        self.outlet = outlet
        self.setup = setup
        var logger = setup.logger
        logger[metadataKey: "node"] = "\(setup.settings.nodeName)"
        self.logger = logger
        self.metrics = setup.metrics
        self.publisher = publisher
        self.cell = cell
        self.follower = TopicFollower(configuration: TopicFollower.Configuration(historyCount: setup.history))
    }

    /// Makes the coordinator and its publisher, and starts connecting. Call on the hub's loop.
    static func make(hub: Hub, loop: any EventLoop, outlet: SubscriberLoops, setup: ClusterSetup) -> ClusterCoordinator {
        let cell = NIOLoopBoundBox<ClusterCoordinator?>(nil, eventLoop: loop)
        let metrics = setup.metrics
        var hooks = ClusterPublisherHooks()
        hooks.queueBytes = { metrics.queued(bytes: $0) }
        hooks.resent = { metrics.resent($0) }
        hooks.reconnected = { metrics.reconnected() }
        hooks.skipped = { _, _ in metrics.skippedLine() }
        hooks.roundTrip = { metrics.roundTrip(nanoseconds: $0.nanoseconds) }
        hooks.readiness = { _ in cell.value?.readinessChanged() }
        hooks.linked = { cell.value?.commandConnectionLinked() }
        var configuration = ClusterPublisherConfiguration(
            nodeName: setup.settings.nodeName, prefix: setup.settings.prefix, history: setup.history,
            topicTTLSeconds: setup.topicTTLSeconds, queueBytes: setup.settings.queueBytes)
        configuration.linesPerCall = setup.settings.linesPerCall
        let publisher = ClusterPublisher(
            endpoint: setup.settings.endpoint, configuration: configuration,
            eventLoop: loop, logger: setup.logger, hooks: hooks)
        let coordinator = ClusterCoordinator(
            loop: loop, hub: hub, outlet: outlet, setup: setup, publisher: publisher, cell: cell)
        cell.value = coordinator
        coordinator.start()
        return coordinator
    }

    private func start() {
        publisher.start()
        connectSubscription()
        let cell = self.cell
        timers.append(
            loop.scheduleRepeatedTask(initialDelay: Self.tickInterval, delay: Self.tickInterval) { _ in
                cell.value?.tick()
            })
        let ttl = setup.topicTTLSeconds
        let refreshEvery = TimeAmount.seconds(Int64(max(1, ttl / 3)))
        timers.append(
            loop.scheduleRepeatedTask(initialDelay: refreshEvery, delay: refreshEvery) { _ in
                cell.value?.refreshWatchedTopics()
            })
        // Nothing can be swept before a TTL has passed; a short TTL (tests) sweeps sooner.
        let sweepEvery = TimeAmount.seconds(Int64(min(60, max(1, ttl))))
        timers.append(
            loop.scheduleRepeatedTask(initialDelay: sweepEvery, delay: sweepEvery) { _ in
                cell.value?.sweepIndex(every: sweepEvery)
            })
        logger.info(
            "cluster mode: events are numbered in Redis",
            metadata: ["redis": "\(setup.settings.endpoint)", "prefix": "\(setup.settings.prefix)"])
    }

    // MARK: - Ingest

    /// Queues accepted lines for Redis, in the order read. Returns a future to stop reading
    /// emitters until when the queue is full.
    func enqueue(_ events: [IncomingEvent]) -> EventLoopFuture<Void>? {
        // The lines are slices of the ingest's read buffers, which a queued slice would keep alive
        // whole (a 200-byte line pinned up to 64 KiB: 50 times the queue's byte count in RSS,
        // seen at 10,000 topics). One compact copy per batch keeps memory at what is queued.
        var compact = allocator.buffer(capacity: events.reduce(0) { $0 + $1.object.readableBytes })
        for event in events { compact.writeImmutableBuffer(event.object) }
        var offset = compact.readerIndex
        let lines = events.map { event -> (topic: String, line: ByteBuffer) in
            let length = event.object.readableBytes
            defer { offset += length }
            return (event.topic, compact.getSlice(at: offset, length: length)!)
        }
        let (result, refused) = publisher.enqueue(contentsOf: lines)
        var pause: EventLoopFuture<Void>?
        if case .pause(let until) = result { pause = until }
        if refused > 0 {
            logger.warning("lines read after the relay began stopping were not published", metadata: ["lines": "\(refused)"])
        }
        return pause
    }

    // MARK: - Readiness

    /// Whether this relay can publish and deliver, and if not why.
    var readiness: (ready: Bool, reason: String) {
        if case .notReady(let reason) = publisher.readiness { return (false, reason) }
        switch link {
        case .connected where linkSynced: return (true, "ready")
        case .connected: return (false, "resubscribing to Redis")
        case .stopped: return (false, "stopping")
        case .idle, .connecting, .waiting: return (false, "the subscription connection to Redis is down")
        }
    }

    private func readinessChanged() {
        metrics.redisUp(readiness.ready)
    }

    // MARK: - Subscriptions

    func subscribe(_ id: SubscriberID, to name: String, resume: ResumePoint?) {
        let pending = PendingSubscribe(id: id, name: name, resume: resume)
        if TopicName.patternPrefix(name) != nil { return subscribePattern(pending) }
        let first = members[name]?.isEmpty ?? true
        members[name, default: []].insert(id)
        if first { run(follower.join(name)) }
        attempt(pending)
    }

    /// Ends subscriptions of a connection that went away; nothing is answered.
    func unsubscribe(_ id: SubscriberID, fromAll names: [String]) {
        for name in names { drop(id, from: name) }
    }

    /// Ends one subscription and answers `unsubscribed` after every frame already planned for it.
    func unsubscribe(_ id: SubscriberID, from name: String, reason: String?) {
        drop(id, from: name)
        flushDeliveries()
        outlet.unsubscribed(id, from: name, reason: reason)
    }

    private func drop(_ id: SubscriberID, from name: String) {
        hub.unsubscribe(id, from: name, now: Monotonic.now)
        if let prefix = TopicName.patternPrefix(name) {
            let key = String(prefix)
            guard var state = patterns[key] else { return }
            state.members.remove(id)
            state.waiting.removeAll { $0.id == id }
            if state.members.isEmpty {
                patterns[key] = nil
                if case .connected(let connection) = link {
                    _ = connection.punsubscribe(patterns: [patternChannel(key)])
                }
            } else {
                patterns[key] = state
            }
            return
        }
        guard var set = members[name], set.remove(id) != nil else { return }
        waitingForJoin[name]?.removeAll { $0.id == id }
        for (waiter, pending) in catchingUp where pending.id == id && pending.name == name {
            catchingUp[waiter] = nil
        }
        if set.isEmpty {
            members[name] = nil
            waitingForJoin[name] = nil
            run(follower.leave(name, now: Monotonic.now))
        } else {
            members[name] = set
        }
    }

    /// Answers a subscribe from the ring when the topic's position is known and covers its
    /// `since`; otherwise parks it until it does.
    private func attempt(_ pending: PendingSubscribe) {
        guard members[pending.name]?.contains(pending.id) == true else { return }
        guard let position = follower.position(of: pending.name) else {
            waitingForJoin[pending.name, default: []].append(pending)
            return
        }
        guard hub.position(of: pending.name) != nil else {
            // The hub forgot the topic (`--max-topics`, `--topic-ttl`) while it was followed.
            waitingForJoin[pending.name, default: []].append(pending)
            run(follower.resync(pending.name))
            return
        }
        if let resume = pending.resume, resume.epoch == position.epoch, resume.since > position.seq {
            nextWaiter += 1
            catchingUp[nextWaiter] = pending
            logger.debug(
                "a resume is ahead of this relay; waiting for it to catch up",
                metadata: ["topic": "\(pending.name)", "since": "\(resume.since)", "at": "\(position)"])
            run(follower.waitFor(pending.name, waiter: nextWaiter, epoch: resume.epoch, seq: resume.since, now: Monotonic.now))
            return
        }
        answer(pending)
    }

    private func answer(_ pending: PendingSubscribe) {
        guard members[pending.name]?.contains(pending.id) == true else { return }
        // Frames planned before the subscriber is registered do not target it; the answer holds them.
        flushDeliveries()
        guard follower.position(of: pending.name) != nil,
            let subscription = hub.subscribeIfHeld(pending.id, to: pending.name, resume: pending.resume, now: Monotonic.now)
        else {
            waitingForJoin[pending.name, default: []].append(pending)
            run(follower.resync(pending.name))
            return
        }
        outlet.subscribed(pending.id, to: pending.name, subscription)
    }

    private func answerWaiting(_ topic: String) {
        guard let waiting = waitingForJoin.removeValue(forKey: topic) else { return }
        for pending in waiting { attempt(pending) }
    }

    // MARK: - Follower actions

    private func run(_ actions: [TopicFollower.Action]) {
        for action in actions {
            switch action {
            case .subscribe(let topic):
                channels.insert(topic)
                subscribeChannel(topic)
            case .unsubscribe(let topic):
                channels.remove(topic)
                if case .connected(let connection) = link {
                    _ = connection.unsubscribe(channels: [topicChannel(topic)])
                }
                hub.forgetTopic(topic)
                if members[topic]?.isEmpty == false {
                    // Cannot happen (the linger ends only without subscribers); never strand one.
                    run(follower.join(topic))
                }
            case .read(let topic, let count, let token):
                readQueue.append(QueuedRead(topic: topic, count: count, token: token))
                pumpReads()
            case .reset(let topic, let epoch, let newestSeq, let events):
                reset(topic, epoch: epoch, newestSeq: newestSeq, events: events)
                answerWaiting(topic)
            case .publish(let topic, let events):
                do {
                    schedule(try hub.publishSequenced(events, now: Monotonic.now))
                } catch {
                    logger.error("the hub refused events from Redis; reading the topic again", metadata: ["error": "\(error)"])
                    run(follower.resync(topic))
                }
            case .answer(_, let waiter):
                if let pending = catchingUp.removeValue(forKey: waiter) { answer(pending) }
            case .overflowed(let topic, let dropped):
                logger.notice(
                    "too many messages during a read; the next read covers them",
                    metadata: ["topic": "\(topic)", "dropped": "\(dropped)"])
            case .repaired(let topic, let count):
                metrics.gapRepaired()
                logger.debug("repaired a gap from history", metadata: ["topic": "\(topic)", "events": "\(count)"])
            }
        }
    }

    private func reset(_ topic: String, epoch: String, newestSeq: UInt64, events: [StoredEvent]) {
        var before = hub.position(of: topic)
        // The hub may hold the topic already, behind, kept for pattern subscribers (joining a topic
        // a pattern here delivers). When the read reaches back to where the hub stands, its pattern
        // subscribers get the events they have not had, in order, rather than only the newest.
        if let held = before, held.epoch == epoch, held.seq < newestSeq, let first = events.first,
            first.seq <= held.seq + 1
        {
            let missing = events.filter { $0.seq > held.seq }.map {
                SequencedEvent(topic: topic, epoch: epoch, seq: $0.seq, object: $0.object)
            }
            if let plan = try? hub.publishSequenced(missing, now: Monotonic.now) {
                schedule(plan)
                before = hub.position(of: topic)
            }
        }
        do {
            let plan = try hub.resetTopic(topic, epoch: epoch, newestSeq: newestSeq, events: events, now: Monotonic.now)
            if let before, before != TopicPosition(epoch: epoch, seq: newestSeq) {
                let reason: ClusterMetrics.ResetReason = before.epoch == epoch ? .history : .epoch
                metrics.topicReset(reason)
                logger.info(
                    "topic reset: its subscribers were told (recovered:false)",
                    metadata: ["topic": "\(topic)", "from": "\(before)", "to": "\(epoch)/\(newestSeq)", "reason": "\(reason)"])
            }
            schedule(plan)
        } catch {
            // The follower and the hub disagree, which is a bug; the hub's copy is dropped when it can be.
            logger.error("the hub refused a topic read from Redis", metadata: ["error": "\(error)"])
            if hub.forgetTopic(topic),
                let plan = try? hub.resetTopic(topic, epoch: epoch, newestSeq: newestSeq, events: events, now: Monotonic.now)
            {
                schedule(plan)
            }
        }
    }

    // MARK: - Fan-out

    /// Merges a plan into this turn's, sent once the loop has handled every message it read.
    private func schedule(_ plan: FanOut) {
        guard plan.deliveryCount > 0 else { return }
        if pendingLoops.isEmpty {
            pendingLoops = plan.loops
            pendingDeliveries = plan.deliveryCount
            let cell = self.cell
            loop.execute { cell.value?.flushDeliveries() }
            return
        }
        // In place: a copy of the merged plan per message made each turn quadratic.
        for index in pendingLoops.indices { pendingLoops[index].append(contentsOf: plan.loops[index]) }
        pendingDeliveries += plan.deliveryCount
    }

    private func flushDeliveries() {
        guard !pendingLoops.isEmpty else { return }
        let plan = FanOut(loops: pendingLoops, deliveryCount: pendingDeliveries)
        pendingLoops = []
        pendingDeliveries = 0
        outlet.deliver(plan)
    }

    // MARK: - Reads

    private func pumpReads() {
        guard readQueueHead < readQueue.count, readsInFlight < Self.maximumReadsInFlight,
            let sequencer = publisher.connectedSequencer
        else { return }
        while readQueueHead < readQueue.count, readsInFlight < Self.maximumReadsInFlight {
            let read = readQueue[readQueueHead]
            readQueueHead += 1
            readsInFlight += 1
            sequencer.read(topic: read.topic, count: read.count).assumeIsolated().whenComplete { result in
                self.readReturned(read, result)
            }
        }
        if readQueueHead == readQueue.count {
            readQueue.removeAll(keepingCapacity: true)
            readQueueHead = 0
        }
    }

    private func readReturned(_ read: QueuedRead, _ result: Result<TopicHistory, any Error>) {
        readsInFlight -= 1
        switch result {
        case .success(let history):
            run(follower.readCompleted(read.topic, token: read.token, history: history))
        case .failure(let error):
            logger.debug("a topic read failed; reading again", metadata: ["topic": "\(read.topic)", "error": "\(error)"])
            // Not at once: a refusal that repeats (OOM) must not spin.
            let cell = self.cell
            loop.scheduleTask(in: .milliseconds(200)) {
                guard let coordinator = cell.value else { return }
                coordinator.run(coordinator.follower.readFailed(read.topic, token: read.token))
            }
        }
        pumpReads()
    }

    private func commandConnectionLinked() {
        readinessChanged()
        pumpReads()
        for prefix in patterns.keys { snapshotPattern(prefix) }
    }

    // MARK: - Subscription connection

    private var probeChannel: String { setup.settings.prefix + ":probe:" + setup.settings.nodeName }
    private var channelPrefix: String { setup.settings.prefix + ":t:" }
    private func topicChannel(_ topic: String) -> String { channelPrefix + topic }
    private func patternChannel(_ prefix: String) -> String { channelPrefix + prefix + "*" }

    private func connectSubscription() {
        guard case .idle = link else {
            guard case .waiting = link else { return }
            return connectNow()
        }
        connectNow()
    }

    private func connectNow() {
        linkGeneration += 1
        let generation = linkGeneration
        link = .connecting
        linkSynced = false
        let cell = self.cell
        let loop = self.loop
        RedisSubscriptionConnection.connect(
            to: setup.settings.endpoint, on: loop, probeChannel: probeChannel,
            publishProbe: {
                guard let coordinator = cell.value, let sequencer = coordinator.publisher.connectedSequencer else {
                    return loop.makeFailedFuture(RedisConnectionError.closed)
                }
                return TopicIndex(connection: sequencer.connection, prefix: coordinator.setup.settings.prefix)
                    .probe(channel: coordinator.probeChannel)
            },
            logger: logger,
            onMessage: { message in cell.value?.received(message, generation: generation) }
        ).assumeIsolated().whenComplete { result in
            self.subscriptionAttemptEnded(result, generation: generation)
        }
    }

    private func subscriptionAttemptEnded(_ result: Result<RedisSubscriptionConnection, any Error>, generation: UInt64) {
        guard generation == linkGeneration, case .connecting = link else {
            if case .success(let connection) = result { _ = connection.close() }
            return
        }
        switch result {
        case .failure(let error):
            logger.warning(
                "cannot open the Redis subscription connection",
                metadata: ["error": "\(error)", "retry_in_ms": "\(linkBackoff.nanoseconds / 1_000_000)"])
            waitThenReconnect()
        case .success(let connection):
            link = .connected(connection)
            if linkedBefore {
                metrics.reconnected()
                logger.info("subscription connection to Redis made again; resubscribing and repairing")
            }
            linkedBefore = true
            connection.closeFuture.assumeIsolated().whenComplete { result in
                self.subscriptionLost(generation: generation, result)
            }
            resubscribe(connection, generation: generation)
        }
        readinessChanged()
    }

    /// Subscribes every followed topic and every pattern again, then reads every followed topic.
    private func resubscribe(_ connection: RedisSubscriptionConnection, generation: UInt64) {
        let topicChannels = channels.sorted().map(topicChannel)
        let patternChannels = patterns.keys.sorted().map(patternChannel)
        let prefixes = Array(patterns.keys)
        connection.subscribe(channels: topicChannels).and(connection.psubscribe(patterns: patternChannels))
            .assumeIsolated().whenComplete { result in
                guard generation == self.linkGeneration else { return }
                switch result {
                case .success:
                    self.linkSynced = true
                    self.linkBackoff = .milliseconds(100)
                    self.readinessChanged()
                    for prefix in prefixes where self.patterns[prefix] != nil {
                        self.patterns[prefix]!.confirmed = true
                        self.snapshotPattern(prefix)
                    }
                    self.run(self.follower.resubscribed())
                case .failure(let error):
                    self.logger.warning("resubscribing failed; making the connection again", metadata: ["error": "\(error)"])
                    _ = connection.close()
                }
            }
    }

    private func subscriptionLost(generation: UInt64, _ result: Result<Void, any Error>) {
        guard generation == linkGeneration, case .connected = link else { return }
        var reason = "closed"
        if case .failure(let error) = result { reason = "\(error)" }
        logger.warning(
            "lost the Redis subscription connection; events wait in Redis and are repaired after it is back",
            metadata: ["reason": "\(reason)"])
        for prefix in patterns.keys { patterns[prefix]!.confirmed = false }
        waitThenReconnect()
        readinessChanged()
    }

    private func waitThenReconnect() {
        linkGeneration += 1
        link = .waiting
        linkSynced = false
        let delay = linkBackoff
        linkBackoff = min(linkBackoff * 2, .seconds(5))
        let cell = self.cell
        loop.scheduleTask(in: delay) { cell.value?.connectSubscription() }
    }

    private func subscribeChannel(_ topic: String) {
        guard case .connected(let connection) = link else { return }  // the next resubscribe covers it
        let generation = linkGeneration
        connection.subscribe(channels: [topicChannel(topic)]).assumeIsolated().whenSuccess {
            guard generation == self.linkGeneration, self.channels.contains(topic) else { return }
            self.run(self.follower.subscribed(topic))
        }
    }

    private func received(_ message: RedisChannelMessage, generation: UInt64) {
        guard generation == linkGeneration else { return }
        var channel = message.channel
        guard channel.readableBytesView.starts(with: channelPrefix.utf8) else {
            return badMessage("a message on an unexpected channel", channel: message.channel)
        }
        channel.moveReaderIndex(forwardBy: channelPrefix.utf8.count)
        guard let topic = channel.readString(length: channel.readableBytes), TopicName.isValidTopic(topic) else {
            return badMessage("a message on an unexpected channel", channel: message.channel)
        }
        let payload: RelayMessagePayload
        do {
            payload = try message.relayPayload()
        } catch {
            return badMessage("a message not in the relay's format (\(error))", channel: message.channel)
        }
        if message.pattern != nil {
            patternMessage(topic, payload)
        } else {
            run(follower.message(topic, payload))
        }
    }

    private func badMessage(_ what: String, channel: ByteBuffer) {
        metrics.badMessage()
        guard badMessagesLogged < 100 else { return }
        badMessagesLogged += 1
        logger.warning("dropped \(what)", metadata: ["channel": "\(String(buffer: channel))"])
    }

    // MARK: - Patterns

    private func subscribePattern(_ pending: PendingSubscribe) {
        let prefix = String(TopicName.patternPrefix(pending.name)!)
        var state = patterns[prefix] ?? PatternState()
        let first = state.members.isEmpty
        state.members.insert(pending.id)
        state.waiting.append(pending)
        patterns[prefix] = state
        if first {
            guard case .connected(let connection) = link else { return }  // the next resubscribe covers it
            let generation = linkGeneration
            connection.psubscribe(patterns: [patternChannel(prefix)]).assumeIsolated().whenSuccess {
                guard generation == self.linkGeneration, self.patterns[prefix] != nil else { return }
                self.patterns[prefix]!.confirmed = true
                self.snapshotPattern(prefix)
            }
        } else {
            snapshotPattern(prefix)
        }
    }

    /// Answers the waiting subscribes of a pattern: the newest event of each matching topic, from
    /// the index, taken into the hub, then the hub's answer (which also holds what arrived since).
    private func snapshotPattern(_ prefix: String) {
        guard let state = patterns[prefix], state.confirmed, !state.snapshotInFlight, !state.waiting.isEmpty,
            let sequencer = publisher.connectedSequencer
        else { return }
        let serving = state.waiting
        patterns[prefix]!.waiting = []
        patterns[prefix]!.snapshotInFlight = true
        TopicIndex(connection: sequencer.connection, prefix: setup.settings.prefix).snapshot(topicPrefix: prefix)
            .assumeIsolated().whenComplete { result in
                guard self.patterns[prefix] != nil else { return }
                self.patterns[prefix]!.snapshotInFlight = false
                switch result {
                case .success(let topics):
                    self.takeSnapshot(topics)
                    self.flushDeliveries()
                    for pending in serving where self.patterns[prefix]?.members.contains(pending.id) == true {
                        if let subscription = self.hub.subscribeIfHeld(
                            pending.id, to: pending.name, resume: nil, now: Monotonic.now)
                        {
                            self.outlet.subscribed(pending.id, to: pending.name, subscription)
                        }
                    }
                case .failure(let error):
                    self.logger.warning("a pattern snapshot failed; trying again", metadata: ["error": "\(error)"])
                    self.patterns[prefix]!.waiting.insert(contentsOf: serving, at: 0)
                }
                // Subscribes that came during this snapshot; a failure is retried by the tick.
                if case .success = result { self.snapshotPattern(prefix) }
            }
    }

    /// Takes the newest events of topics nobody here follows into the hub (followed topics are
    /// current already).
    private func takeSnapshot(_ topics: [SequencedEvent]) {
        for entry in topics where !follower.holds(entry.topic) {
            if let position = hub.position(of: entry.topic), position.epoch == entry.epoch, position.seq >= entry.seq {
                continue
            }
            do {
                schedule(
                    try hub.resetTopic(
                        entry.topic, epoch: entry.epoch, newestSeq: entry.seq,
                        events: [StoredEvent(seq: entry.seq, object: entry.object)], now: Monotonic.now))
            } catch {
                badMessage("a snapshot entry the hub refused (\(error))", channel: ByteBuffer(string: entry.topic))
            }
        }
    }

    /// A message of a topic matched by a pattern. Followed topics come through their own channel.
    private func patternMessage(_ topic: String, _ payload: RelayMessagePayload) {
        guard !follower.holds(topic) else { return }
        let event = SequencedEvent(topic: topic, epoch: payload.epoch, seq: payload.seq, object: payload.line)
        do {
            if let position = hub.position(of: topic) {
                if position.epoch == payload.epoch, payload.seq <= position.seq { return }  // another pattern's copy
                if position.epoch != payload.epoch || payload.seq != position.seq + 1 {
                    schedule(
                        try hub.resetTopic(
                            topic, epoch: payload.epoch, newestSeq: payload.seq,
                            events: [StoredEvent(seq: payload.seq, object: payload.line)], now: Monotonic.now))
                    return
                }
            }
            schedule(try hub.publishSequenced([event], now: Monotonic.now))
        } catch {
            badMessage("a pattern message the hub refused (\(error))", channel: ByteBuffer(string: topic))
        }
    }

    // MARK: - Upkeep

    private func tick() {
        run(follower.tick(now: Monotonic.now))
        pumpReads()
        for (prefix, state) in patterns where !state.waiting.isEmpty && !state.snapshotInFlight {
            snapshotPattern(prefix)
        }
    }

    /// Keeps the keys of topics watched here alive while their task is silent.
    private func refreshWatchedTopics() {
        guard !refreshing, !members.isEmpty, let sequencer = publisher.connectedSequencer else { return }
        refreshing = true
        TopicIndex(connection: sequencer.connection, prefix: setup.settings.prefix)
            .refresh(topics: Array(members.keys), seconds: setup.topicTTLSeconds)
            .assumeIsolated().whenComplete { result in
                self.refreshing = false
                if case .failure(let error) = result {
                    self.logger.debug("refreshing topic TTLs failed", metadata: ["error": "\(error)"])
                }
            }
    }

    /// Removes index members whose topic expired, when this relay wins the turn.
    private func sweepIndex(every interval: TimeAmount) {
        guard !sweeping, let sequencer = publisher.connectedSequencer else { return }
        sweeping = true
        let index = TopicIndex(connection: sequencer.connection, prefix: setup.settings.prefix)
        index.claimSweep(node: setup.settings.nodeName, seconds: Int(interval.nanoseconds / 1_000_000_000))
            .flatMap { [loop] won in won ? index.sweep().map { Optional($0) } : loop.makeSucceededFuture(nil) }
            .assumeIsolated().whenComplete { result in
                self.sweeping = false
                switch result {
                case .success(let removed?) where removed > 0:
                    self.logger.debug("swept expired topics from the index", metadata: ["removed": "\(removed)"])
                case .failure(let error):
                    self.logger.debug("sweeping the topic index failed", metadata: ["error": "\(error)"])
                default:
                    break
                }
            }
    }

    // MARK: - Stop

    /// Hands every queued line to Redis before `deadline`, then closes both connections.
    /// Returns the lines that did not reach Redis.
    func stop(deadline: NIODeadline) -> EventLoopFuture<Int> {
        publisher.flush(deadline: deadline).always { [cell] _ in
            guard let coordinator = cell.value else { return }
            for timer in coordinator.timers { timer.cancel() }
            coordinator.timers = []
            if case .connected(let connection) = coordinator.link { _ = connection.close() }
            coordinator.linkGeneration += 1
            coordinator.link = .stopped
            cell.value = nil
        }
    }
}
