// Hub: topics, sequence numbers, history, subscriptions and the fan-out plan.
//
// The hub is the single owner of every topic's state and does no I/O: it is
// handed batches of validated events and subscription changes, and answers
// with frames and with which subscribers (grouped by event loop) get them.
// The server runs it on one event loop, so nothing here takes a lock.
//
// Every event's WebSocket frame is built once, here, and that same buffer is
// what history holds and what every subscriber is sent.
//
// In cluster mode Redis numbers events instead of the hub (HubSequenced.swift);
// a hub is in one mode for its whole life.

import NIOCore

/// Bounds and sizes of the hub.
public struct HubConfiguration: Sendable {
    /// Events kept per topic for resume (`--history`).
    public var historyLimit: Int
    /// Topics kept (`--max-topics`); beyond it the longest-idle topic is forgotten.
    public var maxTopics: Int
    /// Nanoseconds a topic with no event and no subscriber is kept (`--topic-ttl`).
    public var topicTTL: UInt64
    /// Event loops subscribers live on; `SubscriberID.loop` is below this.
    public var loopCount: Int
    /// Newest events a pattern subscription starts with.
    public var patternSnapshotLimit: Int
    /// Pattern subscriptions of all connections together (`--max-pattern-subscriptions-total`):
    /// every published event is matched against each prefix, so their number is the hub's
    /// per-event cost, and the per-connection bound alone does not bound it.
    public var maxPatternSubscriptions: Int
    /// Who numbers events; fixed for the hub's life (see `HubSequencing`).
    public var sequencing: HubSequencing
    /// Bytes of stored events over all topics (`--max-history-bytes`, HistoryBytes.swift).
    public var maxHistoryBytes: Int
    /// What each topic counts against `maxHistoryBytes` besides its frames.
    public var topicOverheadBytes: Int
    /// What each stored frame counts besides its bytes (its buffer's storage object, malloc
    /// rounding, its ring slot): for small events this is most of their cost.
    public var frameOverheadBytes: Int

    /// Memory a topic takes besides its frames, measured (docs/hardening.md, "Stored history").
    public static let measuredTopicOverheadBytes = 864
    /// Memory a stored frame takes besides its bytes, measured (docs/hardening.md, "Stored history").
    public static let measuredFrameOverheadBytes = 184

    // The defaults, here only: `serve`'s flags show and use these (docs/protocol.md lists them).
    /// `--history`.
    public static let defaultHistoryLimit = 100
    /// `--max-topics`.
    public static let defaultMaxTopics = 100_000
    /// `--topic-ttl`: an hour, in nanoseconds.
    public static let defaultTopicTTL: UInt64 = 3600 * 1_000_000_000
    /// The contract's bound on a pattern's snapshot: the newest events of at most 1000 topics.
    public static let defaultPatternSnapshotLimit = 1000
    /// `--max-pattern-subscriptions-total`.
    public static let defaultMaxPatternSubscriptions = 10_000
    /// `--max-history-bytes`: 256 MiB.
    public static let defaultMaxHistoryBytes = 256 * 1024 * 1024

    public init(
        historyLimit: Int = HubConfiguration.defaultHistoryLimit,
        maxTopics: Int = HubConfiguration.defaultMaxTopics,
        topicTTL: UInt64 = HubConfiguration.defaultTopicTTL,
        loopCount: Int = 1,
        patternSnapshotLimit: Int = HubConfiguration.defaultPatternSnapshotLimit,
        maxPatternSubscriptions: Int = HubConfiguration.defaultMaxPatternSubscriptions,
        sequencing: HubSequencing = .local,
        maxHistoryBytes: Int = HubConfiguration.defaultMaxHistoryBytes,
        topicOverheadBytes: Int = HubConfiguration.measuredTopicOverheadBytes,
        frameOverheadBytes: Int = HubConfiguration.measuredFrameOverheadBytes
    ) {
        self.historyLimit = historyLimit
        self.maxTopics = maxTopics
        self.topicTTL = topicTTL
        self.loopCount = loopCount
        self.patternSnapshotLimit = patternSnapshotLimit
        self.maxPatternSubscriptions = maxPatternSubscriptions
        self.sequencing = sequencing
        self.maxHistoryBytes = maxHistoryBytes
        self.topicOverheadBytes = topicOverheadBytes
        self.frameOverheadBytes = frameOverheadBytes
    }
}

/// One accepted event, as the ingest hands it over.
public struct IncomingEvent: Sendable {
    public var topic: String
    /// The event's JSON object, from its `{` to its `}`.
    public var object: ByteBuffer

    public init(topic: String, object: ByteBuffer) {
        self.topic = topic
        self.object = object
    }
}

/// What one published batch means for each event loop.
public struct FanOut: Sendable {
    /// Indexed by event loop.
    public var loops: [LoopPlan]
    /// Frames written to subscribers in total (for metrics).
    public var deliveryCount: Int

    public init(loops: [LoopPlan], deliveryCount: Int) {
        self.loops = loops
        self.deliveryCount = deliveryCount
    }
}

/// Where a subscriber resumes from.
public struct ResumePoint: Sendable, Equatable {
    public var epoch: String
    public var since: UInt64

    public init(epoch: String, since: UInt64) {
        self.epoch = epoch
        self.since = since
    }
}

/// The answer to a subscription: what the `subscribed` frame says and what to send after it.
public struct Subscription: Sendable {
    /// Nil for a pattern.
    public var epoch: String?
    /// The topic's newest seq (0 for a pattern or a topic with no event yet).
    public var seq: UInt64
    public var recovered: Bool
    /// Replayed events, or the newest event(s), in the order to send them.
    public var frames: [ByteBuffer]
    /// True when a pattern was not subscribed: the relay holds `maxPatternSubscriptions` already.
    public var refused = false
    /// `frames` as SSE, for an event-stream subscriber only (built per subscription: a replay is
    /// one subscriber's, and history keeps WebSocket frames alone).
    public var streamFrames: [ByteBuffer] = []

    /// An answer as the hub builds it; public so that a fake hub (tests, the fuzz harness) can answer too.
    public init(
        epoch: String?, seq: UInt64, recovered: Bool, frames: [ByteBuffer], refused: Bool = false,
        streamFrames: [ByteBuffer] = []
    ) {
        self.epoch = epoch
        self.seq = seq
        self.recovered = recovered
        self.frames = frames
        self.refused = refused
        self.streamFrames = streamFrames
    }
}

/// Counts for `/stats` and metrics.
public struct HubCounts: Sendable, Equatable {
    public var topics: Int
    public var subscriptions: Int
    public var patterns: Int
}

public final class Hub {
    public let configuration: HubConfiguration
    // Internal rather than private where HubSequenced.swift (cluster mode) needs them.
    let allocator = ByteBufferAllocator()
    private let epochPrefix: String
    private var epochSerial: UInt64 = 0

    var topics: [String: Topic] = [:]
    var idle = IdleList()
    /// Pattern subscriptions by prefix, and a version that invalidates every topic's targets.
    private var patterns: [String: [SubscriberID]] = [:]
    private var patternVersion: UInt64 = 1
    /// Pattern subscriptions held, all prefixes together (bounded by `maxPatternSubscriptions`).
    public private(set) var patternSubscriptions = 0
    private var exactSubscriptions = 0
    /// Events published since start, to order topics by their newest event.
    var eventCount: UInt64 = 0
    /// Topics holding history beyond their newest event, for `--max-history-bytes`.
    var historyList = HistoryList()
    /// Bytes counted against `--max-history-bytes`: every frame held, each once, and each topic's overhead.
    public internal(set) var historyBytes = 0
    public internal(set) var historyEvictions = HistoryEvictions()
    /// Steps eviction has taken (frames looked at or copied, topics visited): lets tests check
    /// that it stays amortised O(1) per event by counting work rather than timing it.
    var evictionWork = 0
    /// Topics an HTTP long-poll waits on (HubReads.swift): `awaitedEvent` is told of their events.
    public var awaitedTopics = Set<String>()
    public var awaitedEvent: ((String) -> Void)?

    /// - Parameter epochPrefix: differs on every start without state, so epochs never repeat.
    public init(configuration: HubConfiguration, epochPrefix: String) {
        self.configuration = configuration
        self.epochPrefix = epochPrefix
    }

    public var counts: HubCounts {
        HubCounts(
            topics: topics.count,
            subscriptions: exactSubscriptions + patterns.values.reduce(0) { $0 + $1.count },
            patterns: patterns.count
        )
    }

    // MARK: Publishing

    /// Numbers and frames a batch of events, and says who receives them.
    ///
    /// Single-relay mode only: in cluster mode Redis numbers events (`publishSequenced`).
    public func publish(_ events: [IncomingEvent], now: UInt64) -> FanOut {
        precondition(
            configuration.sequencing == .local, "publish numbers events itself; this hub takes Redis's numbering")
        let loops = configuration.loopCount
        var plan = [LoopPlan](repeating: LoopPlan(), count: loops)
        var deliveries = 0
        var previous: Topic?
        var created = false

        for event in events {
            let topic: Topic
            if let known = topics[event.topic] {
                topic = known
            } else {
                topic = makeTopic(event.topic, now: now)
                created = true
            }
            let frame = event.object.withUnsafeReadableBytes { object in
                WebSocketText.eventFrame(seq: topic.seq + 1, object: object, allocator: allocator)
            }
            eventCount += 1
            topic.append(frame, order: eventCount, now: now)
            settle(topic, eventArrived: true)
            if topic.subscriberCount == 0 { idle.append(topic) }

            let targets = self.targets(of: topic)
            // Consecutive events of one topic share their run: one write batch per subscriber.
            let sameTopic = previous === topic
            var stream: EventStreamFrames?
            for loop in 0..<loops where !targets[loop].isEmpty {
                plan[loop].append(
                    frame, stream: streamFrames(topic, loop: loop, seq: topic.seq, frame: frame, built: &stream),
                    to: targets[loop], continuingRun: sameTopic)
                deliveries += targets[loop].count
            }
            previous = topic
        }
        if created { enforceTopicLimit() }
        enforceHistoryBytes()
        return FanOut(loops: plan, deliveryCount: deliveries)
    }

    func targets(of topic: Topic) -> [[SubscriberID]] {
        if let cached = topic.targets, topic.targetsVersion == patternVersion { return cached }
        var merged = topic.subscribers
        for (prefix, subscribers) in patterns where topic.name.hasPrefix(prefix) {
            for id in subscribers where !merged[id.loop].contains(id) {
                merged[id.loop].append(id)
            }
        }
        topic.targets = merged
        topic.targetsVersion = patternVersion
        topic.streamKinds = merged.map(SSEText.kinds(of:))
        return merged
    }

    /// The event's SSE forms for `loop`, built at most once per event (`built`), and only when a
    /// target on that loop is an event stream. Call after `targets(of:)`.
    func streamFrames(
        _ topic: Topic, loop: Int, seq: UInt64, frame: ByteBuffer, built: inout EventStreamFrames?
    ) -> EventStreamFrames? {
        let kinds = topic.streamKinds[loop]
        guard kinds != 0 else { return nil }
        let have = (built?.topic != nil ? SSEText.topicStream : 0) | (built?.pattern != nil ? SSEText.patternStream : 0)
        if kinds & ~have != 0 {
            let more = SSEText.eventFrames(
                topic: topic.name, epoch: topic.epoch, seq: seq, frame: frame, kinds: kinds & ~have, allocator: allocator)
            built = EventStreamFrames(topic: built?.topic ?? more.topic, pattern: built?.pattern ?? more.pattern)
        }
        return built
    }

    // MARK: Subscriptions

    /// Registers `id` on a topic or pattern and, at the same instant, takes what it must be sent first,
    /// so that no event falls between the replay and live delivery and none comes twice.
    public func subscribe(_ id: SubscriberID, to name: String, resume: ResumePoint?, now: UInt64) -> Subscription {
        if let prefix = TopicName.patternPrefix(name) {
            return subscribe(id, toPrefix: String(prefix))
        }
        let topic: Topic
        if let known = topics[name] {
            topic = known
        } else {
            topic = makeTopic(name, now: now)
        }
        if topic.add(id) { exactSubscriptions += 1 }
        idle.remove(topic)
        enforceTopicLimit()

        var answer: Subscription
        if let resume, resume.epoch == topic.epoch, let missed = topic.history.frames(after: resume.since) {
            answer = Subscription(epoch: topic.epoch, seq: topic.seq, recovered: true, frames: missed)
        } else {
            answer = Subscription(
                epoch: topic.epoch, seq: topic.seq, recovered: false,
                frames: topic.newest.map { [$0] } ?? [])
        }
        if id.isEventStream {
            // The frames end at the topic's newest seq.
            let first = topic.seq - UInt64(answer.frames.count) + 1
            answer.streamFrames = answer.frames.enumerated().map { index, frame in
                SSEText.event(
                    id: SSEText.id(topic: nil, epoch: topic.epoch, seq: first + UInt64(index)),
                    json: WebSocketText.payload(of: frame), allocator: allocator)
            }
        }
        return answer
    }

    private func subscribe(_ id: SubscriberID, toPrefix prefix: String) -> Subscription {
        var subscribers = patterns[prefix] ?? []
        if !subscribers.contains(id) {
            guard patternSubscriptions < configuration.maxPatternSubscriptions else {
                return Subscription(epoch: nil, seq: 0, recovered: false, frames: [], refused: true)
            }
            patternSubscriptions += 1
            subscribers.append(id)
            patterns[prefix] = subscribers
            patternVersion &+= 1
        }
        var matching = topics.values.filter { $0.newest != nil && $0.name.hasPrefix(prefix) }
        matching.sort { $0.lastEventOrder > $1.lastEventOrder }
        let snapshot = matching.prefix(configuration.patternSnapshotLimit)
        var answer = Subscription(epoch: nil, seq: 0, recovered: false, frames: snapshot.compactMap(\.newest))
        if id.isEventStream {
            answer.streamFrames = snapshot.compactMap { topic in
                topic.newest.map {
                    SSEText.event(
                        id: SSEText.id(topic: topic.name, epoch: topic.epoch, seq: topic.seq),
                        json: WebSocketText.payload(of: $0), allocator: allocator)
                }
            }
        }
        return answer
    }

    /// Ends one subscription; false when `id` did not hold it.
    @discardableResult
    public func unsubscribe(_ id: SubscriberID, from name: String, now: UInt64) -> Bool {
        if let prefix = TopicName.patternPrefix(name) {
            let key = String(prefix)
            guard var subscribers = patterns[key], let index = subscribers.firstIndex(of: id) else { return false }
            subscribers.remove(at: index)
            patternSubscriptions -= 1
            patterns[key] = subscribers.isEmpty ? nil : subscribers
            patternVersion &+= 1
            return true
        }
        guard let topic = topics[name], topic.remove(id) else { return false }
        exactSubscriptions -= 1
        if topic.subscriberCount == 0 {
            topic.lastActivity = now
            idle.append(topic)
        }
        return true
    }

    /// Ends every subscription of a connection that went away.
    public func unsubscribe(_ id: SubscriberID, fromAll names: some Sequence<String>, now: UInt64) {
        for name in names { unsubscribe(id, from: name, now: now) }
    }

    // MARK: Bounds

    /// Forgets topics idle for longer than the TTL; returns how many.
    @discardableResult
    public func expire(now: UInt64) -> Int {
        var forgotten = 0
        while let oldest = idle.head, now &- oldest.lastActivity >= configuration.topicTTL, now >= oldest.lastActivity {
            forget(oldest)
            forgotten += 1
        }
        return forgotten
    }

    func enforceTopicLimit() {
        while topics.count > configuration.maxTopics, let oldest = idle.head {
            forget(oldest)
        }
    }

    func forget(_ topic: Topic) {
        idle.remove(topic)
        unaccount(topic)
        topics[topic.name] = nil
    }

    private func makeTopic(_ name: String, now: UInt64) -> Topic {
        // In cluster mode an epoch made here would be a second numbering of a topic Redis numbers.
        precondition(
            configuration.sequencing == .local,
            "cluster mode: the topic must be joined (resetTopic) before it is subscribed (subscribeIfHeld)")
        epochSerial += 1
        let topic = Topic(
            name: name, epoch: epochPrefix + "-" + String(epochSerial, radix: 36),
            historyCapacity: configuration.historyLimit, loops: configuration.loopCount, now: now)
        insert(topic)
        return topic
    }

    // MARK: State

    /// Every topic that has had an event, for the state file.
    public func snapshot() -> [TopicState] {
        topics.values.filter { $0.seq > 0 }.sorted { $0.lastEventOrder < $1.lastEventOrder }.map { topic in
            TopicState(
                name: topic.name, epoch: topic.epoch, seq: topic.seq,
                history: topic.history.all.map(WebSocketText.payload(of:)),
                newest: topic.newest.map(WebSocketText.payload(of:)))
        }
    }

    /// Takes back topics from a state file: each keeps its epoch, seq and history.
    /// Call before any event or subscription.
    public func restore(_ states: [TopicState], now: UInt64) {
        precondition(states.isEmpty || configuration.sequencing == .local, "cluster mode keeps no state file")
        for state in states where TopicName.isValidTopic(state.name) && state.seq > 0 && topics[state.name] == nil {
            let topic = Topic(
                name: state.name, epoch: state.epoch, historyCapacity: configuration.historyLimit,
                loops: configuration.loopCount, now: now)
            topic.seq = state.seq
            let kept = state.history.suffix(configuration.historyLimit)
            var seq = state.seq - UInt64(kept.count)
            topic.history.resume(at: seq)
            for payload in kept {
                seq += 1
                topic.history.append(frame(payload: payload), seq: seq)
            }
            // The ring's last frame is the newest event: share it, as `publish` does, so it is held once.
            topic.newest = topic.ringHoldsNewest ? topic.history.frame(at: topic.history.count - 1)
                : state.newest.map(frame(payload:))
            eventCount += 1
            topic.lastEventOrder = eventCount
            insert(topic)
            idle.append(topic)
        }
        enforceTopicLimit()
        enforceHistoryBytes()
    }

    private func frame(payload: ByteBuffer) -> ByteBuffer {
        var buffer = allocator.buffer(
            capacity: WebSocketText.headerLength(payloadLength: payload.readableBytes) + payload.readableBytes)
        WebSocketText.writeHeader(payloadLength: payload.readableBytes, into: &buffer)
        buffer.writeImmutableBuffer(payload)
        return buffer
    }
}
