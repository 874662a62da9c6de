// HubSequenced: cluster mode, where Redis numbers events and the hub takes that numbering.
//
// With several relays, one script in Redis gives each event of a topic its (epoch, seq), so
// that every relay numbers a topic alike and a subscriber can resume on any of them. The hub
// then numbers nothing. The cluster layer reads a topic's position (`position(of:)`), decides
// whether a message from Redis is delivered, dropped or held until a gap is repaired, and
// hands over only events that continue the topic. The hub checks that once more and refuses a
// batch that breaks it, whole: a ring that skipped or repeated a seq would turn a later resume
// into a silent loss, which is worse than any error.
//
// Everything after the numbering is single-relay mode unchanged: frames built once, history,
// newest, patterns, the answers to subscribe and resume, `--max-topics`, `--topic-ttl`.
//
// A hub runs in one mode for its whole life (`HubConfiguration.sequencing`); the entry points
// of the other mode trap. Mixing them would give one topic two numberings.

import NIOCore

/// Who numbers a hub's events, for the hub's whole life.
public enum HubSequencing: Sendable, Equatable {
    /// Single relay: `publish` numbers each topic's events and makes its epochs.
    case local
    /// Cluster mode: Redis numbers events. Use `publishSequenced`, `resetTopic` and
    /// `subscribeIfHeld`; `publish`, `restore` with states, and `subscribe` to a topic the hub
    /// does not hold trap.
    case external
}

/// Where a topic's numbering stands: its epoch and newest seq (0 when it has had no event).
public struct TopicPosition: Sendable, Equatable, CustomStringConvertible {
    public var epoch: String
    public var seq: UInt64

    public init(epoch: String, seq: UInt64) {
        self.epoch = epoch
        self.seq = seq
    }

    public var description: String { "\(epoch)/\(seq)" }
}

/// An event Redis has numbered, as the cluster layer hands it to the hub.
public struct SequencedEvent: Sendable {
    public var topic: String
    public var epoch: String
    public var seq: UInt64
    /// The event's JSON object as emitted (without `seq`), from its `{` to its `}`.
    public var object: ByteBuffer

    public init(topic: String, epoch: String, seq: UInt64, object: ByteBuffer) {
        self.topic = topic
        self.epoch = epoch
        self.seq = seq
        self.object = object
    }
}

/// One event of a topic's history as read from Redis (the topic and epoch are the reset's).
public struct StoredEvent: Sendable {
    public var seq: UInt64
    /// The event's JSON object as emitted (without `seq`), from its `{` to its `}`.
    public var object: ByteBuffer

    public init(seq: UInt64, object: ByteBuffer) {
        self.seq = seq
        self.object = object
    }
}

/// Why the hub refused a sequenced batch or a reset. The hub changed nothing.
public struct SequenceViolation: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        /// The seq is not above the topic's newest: the event is applied already.
        case duplicate
        /// The seq skips events, which must be read from Redis and applied first.
        case gap
        /// The event belongs to another epoch than the topic: the topic must be reset.
        case otherEpoch
        /// A reset to the topic's own epoch below its newest seq: a read older than what the hub
        /// already applied, or a rollback Redis should have announced with a new epoch. Either
        /// way taking it would give a seq a second event.
        case rewind
        /// A reset's history is not consecutive seqs ending at the reset's newest seq.
        case brokenHistory
        /// Not a JSON object from `{` to `}`, seq 0 for an event, or a topic name the relay
        /// would not accept: data from Redis is not trusted as the local ingest's output is.
        case malformed
    }

    public var kind: Kind
    public var topic: String
    /// The offending event's index in the batch or in the reset's history; nil for a reset as a whole.
    public var index: Int?
    /// Where the topic stood (in a batch: after the batch's earlier events); nil when the hub does not hold it.
    public var current: TopicPosition?
    /// What the event or the reset said.
    public var claimed: TopicPosition

    public init(kind: Kind, topic: String, index: Int?, current: TopicPosition?, claimed: TopicPosition) {
        self.kind = kind
        self.topic = topic
        self.index = index
        self.current = current
        self.claimed = claimed
    }

    public var description: String {
        "\(kind.rawValue) on \(topic): at \(current.map(\.description) ?? "nothing"), got \(claimed)"
            + (index.map { " (index \($0))" } ?? "")
    }
}

extension Hub {
    /// The topic's epoch and newest seq, or nil when the hub does not hold it (never joined, or forgotten).
    ///
    /// The cluster layer decides deliver, drop or hold against this, so that it never keeps a
    /// second copy of the numbering that could drift from the ring's.
    public func position(of name: String) -> TopicPosition? {
        topics[name].map { TopicPosition(epoch: $0.epoch, seq: $0.seq) }
    }

    /// Applies events numbered by Redis, in order, and says who receives them, as `publish` does.
    ///
    /// Each event must be the next of its topic: the topic's epoch and newest seq + 1 (counting
    /// the batch's earlier events). A gap repaired from Redis is one batch of the missing events
    /// followed by the one that was held. A topic the hub does not hold starts at its event: its
    /// ring then vouches for nothing older, so a resume from before it gets `recovered:false`.
    ///
    /// - Throws: the first violation; then no event of the batch is applied.
    public func publishSequenced(_ events: [SequencedEvent], now: UInt64) throws(SequenceViolation) -> FanOut {
        precondition(
            configuration.sequencing == .external, "publishSequenced takes Redis's numbering; this hub numbers itself")
        try check(events)

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
                topic = Topic(
                    name: event.topic, epoch: event.epoch, historyCapacity: configuration.historyLimit,
                    loops: loops, now: now)
                topic.seq = event.seq - 1
                topic.history.resume(at: event.seq - 1)
                insert(topic)
                created = true
            }
            let frame = event.object.withUnsafeReadableBytes { object in
                WebSocketText.eventFrame(seq: event.seq, object: object, allocator: allocator)
            }
            eventCount += 1
            topic.append(frame, order: eventCount, now: now)
            settle(topic, eventArrived: true)
            assert(topic.seq == event.seq && topic.epoch == event.epoch)
            if topic.subscriberCount == 0 { idle.append(topic) }

            let targets = self.targets(of: topic)
            let sameTopic = previous === topic
            var stream: EventStreamFrames?
            for loop in 0..<loops where !targets[loop].isEmpty {
                plan[loop].append(
                    frame, stream: streamFrames(topic, loop: loop, seq: event.seq, frame: frame, built: &stream),
                    to: targets[loop], continuingRun: sameTopic)
                deliveries += targets[loop].count
            }
            previous = topic
        }
        if created { enforceTopicLimit() }
        enforceHistoryBytes()
        return FanOut(loops: plan, deliveryCount: deliveries)
    }

    /// Validates a whole batch before any of it is applied, so that a refused batch changes nothing.
    private func check(_ events: [SequencedEvent]) throws(SequenceViolation) {
        // Positions the batch's earlier events lead to; only needed when there is more than one.
        var pending: [String: TopicPosition] = [:]
        for (index, event) in events.enumerated() {
            let current = pending[event.topic] ?? position(of: event.topic)
            let claimed = TopicPosition(epoch: event.epoch, seq: event.seq)
            let kind: SequenceViolation.Kind?
            if !Self.isObject(event.object) {
                kind = .malformed
            } else if let current {
                if event.epoch != current.epoch {
                    kind = .otherEpoch
                } else if event.seq <= current.seq {
                    kind = .duplicate
                } else if event.seq - current.seq != 1 {
                    kind = .gap
                } else {
                    kind = nil
                }
            } else {
                kind = event.seq == 0 || !TopicName.isValidTopic(event.topic) ? .malformed : nil
            }
            if let kind {
                throw SequenceViolation(
                    kind: kind, topic: event.topic, index: index, current: current, claimed: claimed)
            }
            if events.count > 1 { pending[event.topic] = claimed }
        }
    }

    /// Replaces a topic's numbering with the one read from Redis, and says what its subscribers
    /// must be sent. Also how a topic is joined (its first local subscriber here): the read
    /// history seeds the ring before the subscription is answered (`subscribeIfHeld`).
    ///
    /// - A topic the hub does not hold is created with this numbering and nobody is told: no one
    ///   here has seen it. The topic limit is applied by the next subscribe or publish, so that
    ///   the subscribe that follows a join always finds the topic.
    /// - The same epoch and seq as the hub's: nothing happened, nobody is told. The ring takes the
    ///   read history when it reaches further back (a topic kept only for patterns holds little).
    /// - Otherwise (another epoch, or the same epoch further on than history can repair) each
    ///   exact subscriber is sent `{"op":"subscribed","topic":T,"epoch":E,"seq":S,"recovered":false}`
    ///   and then every event of the new numbering the ring holds (the newest alone with
    ///   `--history 0`), oldest first; S is the seq just before the first of them (the newest seq
    ///   when none follows). That tells a live client that the stream was reset and where it now
    ///   stands, and loses nothing Redis still has: after a Redis restart without data, the lines
    ///   published before this relay read the topic arrive as seq 1, 2, ... of the new epoch.
    ///   Pattern subscribers are sent the same events, without the frame (a pattern has no epoch).
    ///
    /// - Parameters:
    ///   - epoch: the topic's epoch in Redis.
    ///   - newestSeq: the topic's newest seq in Redis; 0 when it has no event.
    ///   - events: history read from Redis, oldest first, consecutive and ending at `newestSeq`
    ///     (may be empty, or shorter than `--history`; only the newest `--history` are kept).
    /// - Throws: a violation (`malformed`, `brokenHistory`, `rewind`); then nothing changed.
    public func resetTopic(
        _ name: String, epoch: String, newestSeq: UInt64, events: [StoredEvent], now: UInt64
    ) throws(SequenceViolation) -> FanOut {
        precondition(
            configuration.sequencing == .external, "resetTopic takes Redis's numbering; this hub numbers itself")
        let held = topics[name]
        let current = held.map { TopicPosition(epoch: $0.epoch, seq: $0.seq) }
        let claimed = TopicPosition(epoch: epoch, seq: newestSeq)
        func violation(_ kind: SequenceViolation.Kind, at index: Int? = nil) -> SequenceViolation {
            SequenceViolation(kind: kind, topic: name, index: index, current: current, claimed: claimed)
        }

        guard TopicName.isValidTopic(name) else { throw violation(.malformed) }
        guard UInt64(events.count) <= newestSeq else { throw violation(.brokenHistory, at: 0) }
        let firstSeq = newestSeq &- UInt64(events.count) &+ 1
        for (index, stored) in events.enumerated() {
            guard Self.isObject(stored.object) else { throw violation(.malformed, at: index) }
            guard stored.seq == firstSeq + UInt64(index) else { throw violation(.brokenHistory, at: index) }
        }
        if let current, current.epoch == epoch, newestSeq < current.seq { throw violation(.rewind) }

        let kept = events.suffix(configuration.historyLimit)
        var ring = HistoryRing(capacity: configuration.historyLimit)
        ring.resume(at: newestSeq - UInt64(kept.count))
        var newest: ByteBuffer?
        for stored in kept {
            let frame = eventFrame(stored)
            ring.append(frame, seq: stored.seq)
            newest = frame
        }
        // With `--history 0` the ring holds nothing, but the newest event is still kept.
        if newest == nil, let last = events.last { newest = eventFrame(last) }
        let empty = FanOut(loops: [LoopPlan](repeating: LoopPlan(), count: configuration.loopCount), deliveryCount: 0)

        guard let topic = held else {
            let topic = Topic(
                name: name, epoch: epoch, historyCapacity: configuration.historyLimit,
                loops: configuration.loopCount, now: now)
            topic.replace(epoch: epoch, seq: newestSeq, history: ring, newest: newest)
            if newest != nil {
                eventCount += 1
                topic.lastEventOrder = eventCount
            }
            insert(topic)
            idle.append(topic)
            // Like the topic limit, `--max-history-bytes` waits for the next publish: eviction
            // here could forget the topic before the subscribe that follows the join.
            return empty
        }

        topic.lastActivity = now
        if topic.subscriberCount == 0 { idle.append(topic) }
        if current == claimed {
            if ring.count > topic.history.count {
                topic.replace(epoch: epoch, seq: newestSeq, history: ring, newest: newest ?? topic.newest)
                settle(topic, eventArrived: false)
            }
            return empty
        }

        topic.replace(epoch: epoch, seq: newestSeq, history: ring, newest: newest)
        if newest != nil {
            eventCount += 1
            topic.lastEventOrder = eventCount
        }
        settle(topic, eventArrived: newest != nil)
        // After the plan is built: it holds its frames, whatever eviction then drops.
        let plan = resetPlan(topic)
        enforceHistoryBytes()
        return plan
    }

    /// The repeated `subscribed` (built once) for exact subscribers, then the ring's events for
    /// every subscriber of the topic, exact or pattern, listed once: two runs per loop, so each
    /// frame is held once and an exact subscriber gets them in that order.
    private func resetPlan(_ topic: Topic) -> FanOut {
        let loops = configuration.loopCount
        var plan = [LoopPlan](repeating: LoopPlan(), count: loops)
        var deliveries = 0
        var following = topic.history.all
        if following.isEmpty, let newest = topic.newest { following = [newest] }
        let subscribed = topic.subscriberCount == 0
            ? nil
            : WebSocketText.subscribedFrame(
                topic: topic.name, epoch: topic.epoch, seq: topic.seq - UInt64(following.count), recovered: false,
                allocator: allocator)
        let targets = self.targets(of: topic)
        // SSE forms, built once for every loop that has an event stream among the targets.
        let firstSeq = topic.seq - UInt64(following.count) + 1
        var streams = [EventStreamFrames?](repeating: nil, count: following.count)
        let subscribedStream = subscribed.map {
            EventStreamFrames(
                topic: SSEText.event(
                    name: "subscribed",
                    id: SSEText.id(topic: nil, epoch: topic.epoch, seq: topic.seq - UInt64(following.count)),
                    json: WebSocketText.payload(of: $0), allocator: allocator),
                pattern: nil)
        }
        for loop in 0..<loops {
            let exact = topic.subscribers[loop]
            if let subscribed, !exact.isEmpty {
                let stream = exact.contains(where: \.isEventStream) ? subscribedStream : nil
                plan[loop].append(subscribed, stream: stream, to: exact, continuingRun: false)
                deliveries += exact.count
            }
            guard !targets[loop].isEmpty else { continue }
            for (index, frame) in following.enumerated() {
                let stream = streamFrames(
                    topic, loop: loop, seq: firstSeq + UInt64(index), frame: frame, built: &streams[index])
                plan[loop].append(frame, stream: stream, to: targets[loop], continuingRun: index > 0)
            }
            deliveries += targets[loop].count * following.count
        }
        return FanOut(loops: plan, deliveryCount: deliveries)
    }

    /// `subscribe`, for cluster mode: nil when the hub does not hold the topic, which must then be
    /// joined (`resetTopic` with the history read from Redis) before the subscription is answered.
    ///
    /// `subscribe` itself would make a local epoch for an unknown topic, a second numbering next
    /// to Redis's; and the hub may have forgotten a topic (`--max-topics`, `--topic-ttl`) that the
    /// cluster layer still counts as joined. Patterns never need a join and are always answered.
    public func subscribeIfHeld(
        _ id: SubscriberID, to name: String, resume: ResumePoint?, now: UInt64
    ) -> Subscription? {
        if TopicName.patternPrefix(name) == nil, topics[name] == nil { return nil }
        return subscribe(id, to: name, resume: resume, now: now)
    }

    /// Forgets a topic that has no exact subscriber (pattern subscribers do not hold a topic):
    /// the cluster layer stopped following it, so its ring would go stale. False when the topic
    /// still has exact subscribers or is not held.
    @discardableResult
    public func forgetTopic(_ name: String) -> Bool {
        precondition(configuration.sequencing == .external, "only cluster mode forgets topics on request")
        guard let topic = topics[name], topic.subscriberCount == 0 else { return false }
        forget(topic)
        return true
    }

    private func eventFrame(_ stored: StoredEvent) -> ByteBuffer {
        stored.object.withUnsafeReadableBytes { object in
            WebSocketText.eventFrame(seq: stored.seq, object: object, allocator: allocator)
        }
    }

    /// Whether `buffer` can be framed: `eventFrame` traps on anything that does not start with `{`.
    private static func isObject(_ buffer: ByteBuffer) -> Bool {
        buffer.readableBytes >= 2
            && buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) == UInt8(ascii: "{")
            && buffer.getInteger(at: buffer.writerIndex - 1, as: UInt8.self) == UInt8(ascii: "}")
    }
}
