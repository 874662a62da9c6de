// TopicFollower: how a relay follows the topics it holds live in cluster mode, with no I/O.
//
// Redis numbers every topic's events; a relay learns them from its subscription connection, which
// can lose messages (a blip, Redis cutting a slow client), and from `read` calls of the script.
// The hub takes only events that continue a topic (`publishSequenced`) or a whole new numbering
// (`resetTopic`). Between the two sits this state machine: for every live topic it decides what
// an arriving message, a read's reply or a reconnection means, and answers with actions for the
// I/O layer to carry out, in order (subscribe, read, publish to the hub, reset the hub, answer a
// waiting subscribe, unsubscribe). It owns no timer and no connection, so every path, including
// the rare ones (a lost message, a new epoch, a read overtaken by messages), is tested by driving
// it with inputs (the shape of swift-nio's state machines).
//
// The one rule everything rests on: **a read covers every message that arrived before the read
// was issued.** The I/O layer sends a read after it has handed the follower every message that
// arrived before; those messages were published before the read runs in Redis, so they are in
// its reply (or older than its history, or of an epoch the reply replaced). So when a read is
// issued the held messages are dropped, and only messages that arrive while it is outstanding are
// held, to be merged by seq after its reply is applied. This is how a join merges the buffered
// messages, how a gap is repaired, and why a bounded buffer may simply be emptied: the next read
// covers what it dropped.

import NIOCore
import RelayHub

/// The per-topic follow logic of cluster mode: join, live deliver/drop/hold, repair, reset, linger.
///
/// Feed it what happens (``join(_:)``, ``subscribed(_:)``, ``message(_:_:)``,
/// ``readCompleted(_:token:history:)``, ``resubscribed()``, ``leave(_:now:)``, ``tick(now:)``…)
/// and carry out the returned ``Action``s in order. It is a value type with no I/O and no clock
/// of its own: time comes in as monotonic nanoseconds.
///
/// Requirements on the I/O layer:
/// - inputs come from one thread, messages in the order the subscription connection delivered them;
/// - a `.read` action is sent to Redis after every message handed to the follower before it (the
///   command connection's FIFO gives this when the read is written as soon as it is returned);
/// - `.publish` and `.reset` are applied to the hub in order; the follower's position of a topic
///   is the hub's as long as they are (a refused batch is a bug: call ``resync(_:)``);
/// - after `.unsubscribe` the hub must no longer answer subscribes for the topic from its ring,
///   which stops being updated.
public struct TopicFollower: Sendable {
    /// Limits and durations.
    public struct Configuration: Sendable, Equatable {
        /// The `count` of every read: `--history`.
        public var historyCount: Int
        /// Messages held per topic while a read is outstanding; beyond it they are dropped and the
        /// topic is read again once the outstanding read has been applied.
        public var holdLimit: Int
        /// How long a topic with no local subscriber stays subscribed (30 s).
        public var lingerNanoseconds: UInt64
        /// How long a subscribe with a `since` ahead of the ring waits before the topic is read (2 s).
        public var catchUpNanoseconds: UInt64
        /// Subscribes waiting per topic; one more is answered at once.
        public var waiterLimit: Int

        /// - Parameters:
        ///   - historyCount: `--history`, the count of every read.
        ///   - holdLimit: messages held per topic during a read (at least 1).
        public init(
            historyCount: Int, holdLimit: Int = 4096, lingerNanoseconds: UInt64 = 30_000_000_000,
            catchUpNanoseconds: UInt64 = 2_000_000_000, waiterLimit: Int = 1024
        ) {
            precondition(historyCount >= 0 && holdLimit >= 1 && waiterLimit >= 0)
            self.historyCount = historyCount
            self.holdLimit = holdLimit
            self.lingerNanoseconds = lingerNanoseconds
            self.catchUpNanoseconds = catchUpNanoseconds
            self.waiterLimit = waiterLimit
        }
    }

    /// Names one read, so that the reply of a read that was superseded (by a reconnection, an
    /// overflow, a waiting subscribe's deadline) is recognised and ignored.
    public struct ReadToken: Hashable, Sendable, CustomStringConvertible {
        public let value: UInt64
        public var description: String { "read#\(value)" }
    }

    /// What the I/O layer must do, in the order returned. Every action names its topic.
    public enum Action: Sendable {
        /// `SUBSCRIBE P:t:<topic>`; then call ``subscribed(_:)`` on its confirmation.
        case subscribe(topic: String)
        /// `UNSUBSCRIBE P:t:<topic>`; the follower has forgotten the topic, and so must the hub.
        case unsubscribe(topic: String)
        /// Run the script in `read` mode; then call ``readCompleted(_:token:history:)`` or
        /// ``readFailed(_:token:)`` with this token.
        case read(topic: String, count: Int, token: ReadToken)
        /// `Hub.resetTopic`: on a join it seeds the topic quietly; otherwise the hub tells the
        /// subscribers that the stream was reset (`recovered:false`). `events` are consecutive and
        /// end at `newestSeq` (possibly empty).
        case reset(topic: String, epoch: String, newestSeq: UInt64, events: [StoredEvent])
        /// `Hub.publishSequenced`: each event continues the topic (same epoch, next seq).
        case publish(topic: String, events: [SequencedEvent])
        /// Answer the waiting subscribe `waiter` from the hub's ring now.
        case answer(topic: String, waiter: UInt64)
        /// Held messages were dropped because the hold limit was reached; a read will cover them.
        /// For the log and a counter.
        case overflowed(topic: String, dropped: Int)
        /// A read filled a gap in the same epoch: the `.publish` that follows starts with the
        /// `events` missing events. For the log and a counter (`progress_relay_gaps_repaired_total`).
        case repaired(topic: String, events: Int)
    }

    private struct Waiter {
        var id: UInt64
        var epoch: String
        var seq: UInt64
        var deadline: UInt64
        /// The deadline passed and a read was issued for it: answered when that read is applied.
        var expired = false
    }

    private struct PendingRead {
        var token: ReadToken
        /// The hold limit was reached during this read: read again after applying it.
        var overflowed = false
    }

    private struct TopicState {
        /// Redis confirmed the subscription (or the resubscription after a reconnection).
        var confirmed = false
        /// Where the hub's topic stands; nil until the join's read is applied.
        var position: TopicPosition?
        /// The outstanding read, if any.
        var read: PendingRead?
        /// Messages that arrived while `read` is outstanding, in arrival order.
        var held: [RelayMessagePayload] = []
        /// The last local subscriber left: unsubscribe at this time unless joined again.
        var lingerUntil: UInt64?
        var waiters: [Waiter] = []
    }

    /// The limits and durations this follower was made with.
    public let configuration: Configuration
    private var topics: [String: TopicState] = [:]
    private var nextToken: UInt64 = 0

    /// Creates a follower that holds no topic.
    public init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// The topics held (subscribed or being subscribed), lingering ones included.
    public var topicCount: Int { topics.count }

    /// Whether the topic is held: joined (perhaps still being subscribed or read) or lingering.
    public func holds(_ topic: String) -> Bool { topics[topic] != nil }

    /// Where the follower believes the hub's topic stands; nil when it is not held or not yet joined.
    public func position(of topic: String) -> TopicPosition? { topics[topic]?.position }

    // MARK: - Inputs

    /// The topic's first local subscriber: subscribe (unless held already; a lingering topic just
    /// stays). Subscribes to it are answered once its position is known (``position(of:)``).
    public mutating func join(_ topic: String) -> [Action] {
        if topics[topic] != nil {
            topics[topic]!.lingerUntil = nil
            return []
        }
        topics[topic] = TopicState()
        return [.subscribe(topic: topic)]
    }

    /// The last local subscriber left: the topic stays subscribed for the linger time.
    public mutating func leave(_ topic: String, now: UInt64) -> [Action] {
        guard topics[topic] != nil else { return [] }
        topics[topic]!.lingerUntil = now &+ configuration.lingerNanoseconds
        return []
    }

    /// Redis confirmed `SUBSCRIBE` of the topic: read it.
    ///
    /// Messages that came before are dropped: the read covers them.
    public mutating func subscribed(_ topic: String) -> [Action] {
        guard var state = topics[topic], !state.confirmed else { return [] }
        state.confirmed = true
        let action = issueRead(topic, &state)
        topics[topic] = state
        return [action]
    }

    /// The subscription connection came back and Redis confirmed every channel again: read every
    /// held topic (the I/O layer pipelines them) and repair from the replies. Topics in order of name.
    public mutating func resubscribed() -> [Action] {
        var actions: [Action] = []
        actions.reserveCapacity(topics.count)
        for topic in topics.keys.sorted() {
            var state = topics[topic]!
            state.confirmed = true
            actions.append(issueRead(topic, &state))
            topics[topic] = state
        }
        return actions
    }

    /// Reads the topic again and makes its reply the truth: for a hub batch that was refused (a bug).
    public mutating func resync(_ topic: String) -> [Action] {
        guard var state = topics[topic], state.confirmed else { return [] }
        state.position = nil
        let action = issueRead(topic, &state)
        topics[topic] = state
        return [action]
    }

    /// A message of the topic's channel: `<seq>:<epoch>:<line>`.
    ///
    /// Live: the next seq of the same epoch is published; an older one is dropped; anything else
    /// (a gap, another epoch) makes a read, which repairs or resets. During a read it is held.
    public mutating func message(_ topic: String, _ payload: RelayMessagePayload) -> [Action] {
        guard var state = topics[topic], state.confirmed else { return [] }
        var actions: [Action] = []
        if state.read != nil {
            hold(topic, payload, &state, &actions)
        } else {
            _ = follow(topic, payload, &state, &actions)
            answerWaiters(topic, &state, &actions)
        }
        topics[topic] = state
        return actions
    }

    /// The reply of a read. A reply to a read that was superseded is ignored.
    ///
    /// On a join, or when the epoch differs, or when history no longer reaches back to the first
    /// missing seq: `.reset`. Otherwise the missing events are published. Then the messages held
    /// meanwhile are merged by seq (older dropped, the next published, a gap makes another read).
    public mutating func readCompleted(_ topic: String, token: ReadToken, history: TopicHistory) -> [Action] {
        guard var state = topics[topic], let read = state.read, read.token == token else { return [] }
        state.read = nil
        var actions: [Action] = []
        apply(topic, history, &state, &actions)

        if read.overflowed {
            actions.append(issueRead(topic, &state))
        } else {
            let held = state.held
            state.held.removeAll(keepingCapacity: true)
            for payload in held {
                // A read issued here covers the rest of the held messages.
                if follow(topic, payload, &state, &actions) { break }
            }
        }
        answerWaiters(topic, &state, &actions)
        topics[topic] = state
        return actions
    }

    /// A read failed (the command connection was lost, Redis refused it): the topic is read again.
    /// The I/O layer sends the new read once the command connection is back.
    public mutating func readFailed(_ topic: String, token: ReadToken) -> [Action] {
        guard var state = topics[topic], state.read?.token == token else { return [] }
        let action = issueRead(topic, &state)
        topics[topic] = state
        return [action]
    }

    /// A subscribe whose `since` is ahead of the topic's newest in the same `epoch` (the client saw
    /// it on a faster relay): `.answer` once the ring has caught up, or once the topic was read
    /// after `deadline` (now + ``Configuration/catchUpNanoseconds``, passed by ``tick(now:)``).
    /// Answered at once when there is nothing to wait for, or when the topic has
    /// ``Configuration/waiterLimit`` waiters already.
    public mutating func waitFor(_ topic: String, waiter: UInt64, epoch: String, seq: UInt64, now: UInt64) -> [Action] {
        guard var state = topics[topic] else { return [.answer(topic: topic, waiter: waiter)] }
        if let position = state.position, position.epoch != epoch || position.seq >= seq {
            return [.answer(topic: topic, waiter: waiter)]
        }
        guard state.waiters.count < configuration.waiterLimit else { return [.answer(topic: topic, waiter: waiter)] }
        state.waiters.append(
            Waiter(id: waiter, epoch: epoch, seq: seq, deadline: now &+ configuration.catchUpNanoseconds))
        topics[topic] = state
        return []
    }

    /// The clock: lingering topics whose time is up are unsubscribed and forgotten; topics with a
    /// waiting subscribe past its deadline are read.
    public mutating func tick(now: UInt64) -> [Action] {
        var actions: [Action] = []
        for topic in topics.keys.sorted() {
            var state = topics[topic]!
            if let until = state.lingerUntil, until <= now {
                for waiter in state.waiters { actions.append(.answer(topic: topic, waiter: waiter.id)) }
                topics[topic] = nil
                actions.append(.unsubscribe(topic: topic))
                continue
            }
            var due = false
            for index in state.waiters.indices where !state.waiters[index].expired && state.waiters[index].deadline <= now {
                state.waiters[index].expired = true
                due = true
            }
            if due {
                if state.confirmed {
                    actions.append(issueRead(topic, &state))
                }  // else the read that follows the confirmation serves them.
                topics[topic] = state
            }
        }
        return actions
    }

    // MARK: - Internals

    /// Starts a read, superseding any outstanding one. Held messages are dropped: the read covers them.
    private mutating func issueRead(_ topic: String, _ state: inout TopicState) -> Action {
        nextToken += 1
        let token = ReadToken(value: nextToken)
        state.read = PendingRead(token: token)
        state.held.removeAll(keepingCapacity: true)
        return .read(topic: topic, count: configuration.historyCount, token: token)
    }

    /// Holds a message during a read, within the hold limit.
    private func hold(_ topic: String, _ payload: RelayMessagePayload, _ state: inout TopicState, _ actions: inout [Action]) {
        guard !state.read!.overflowed else { return }  // the read after this one covers it
        if state.held.count < configuration.holdLimit {
            state.held.append(payload)
            return
        }
        let dropped = state.held.count + 1
        state.held.removeAll()
        state.read!.overflowed = true
        actions.append(.overflowed(topic: topic, dropped: dropped))
    }

    /// A message of a live topic. Returns true when it issued a read.
    private mutating func follow(
        _ topic: String, _ payload: RelayMessagePayload, _ state: inout TopicState, _ actions: inout [Action]
    ) -> Bool {
        guard let position = state.position else {
            // Not joined yet and no read outstanding (cannot happen while confirmed): read.
            actions.append(issueRead(topic, &state))
            return true
        }
        if payload.epoch == position.epoch {
            if payload.seq <= position.seq { return false }
            if payload.seq == position.seq + 1 {
                state.position!.seq = payload.seq
                Self.publish(
                    SequencedEvent(topic: topic, epoch: payload.epoch, seq: payload.seq, object: payload.line),
                    into: &actions)
                return false
            }
        }
        // A gap, or another epoch: the read covers this message.
        actions.append(issueRead(topic, &state))
        return true
    }

    /// Applies a read's reply: reset, publish what is missing, or nothing.
    private func apply(_ topic: String, _ history: TopicHistory, _ state: inout TopicState, _ actions: inout [Action]) {
        let newest = UInt64(clamping: history.seq)
        // Keep the consecutive run of entries that ends at the newest seq (Redis is not trusted blindly).
        var events: [StoredEvent] = []
        var expected = newest
        for entry in history.entries.reversed() {
            guard expected > 0, entry.seq >= 0, UInt64(entry.seq) == expected else { break }
            events.append(StoredEvent(seq: expected, object: entry.line))
            expected -= 1
        }
        events.reverse()

        if let position = state.position, position.epoch == history.epoch {
            // Same epoch: a read issued after every applied message is never behind them.
            guard newest > position.seq else { return }
            if let first = events.first, first.seq <= position.seq + 1 {
                state.position!.seq = newest
                actions.append(.repaired(topic: topic, events: Int(newest - position.seq)))
                for event in events where event.seq > position.seq {
                    Self.publish(
                        SequencedEvent(topic: topic, epoch: history.epoch, seq: event.seq, object: event.object),
                        into: &actions)
                }
                return
            }
        }
        // A join, another epoch, or history that no longer reaches the first missing event.
        state.position = TopicPosition(epoch: history.epoch, seq: newest)
        actions.append(.reset(topic: topic, epoch: history.epoch, newestSeq: newest, events: events))
    }

    /// Appends an event, extending the previous action when it is a publish of the same topic, so
    /// that a repair is one batch (the missing events, then the held ones).
    private static func publish(_ event: SequencedEvent, into actions: inout [Action]) {
        if case .publish(let topic, var events) = actions.last, topic == event.topic {
            actions.removeLast()
            events.append(event)
            actions.append(.publish(topic: topic, events: events))
        } else {
            actions.append(.publish(topic: event.topic, events: [event]))
        }
    }

    /// Answers the waiters the topic's position now satisfies, and the expired ones once the read
    /// issued for them has been applied.
    private func answerWaiters(_ topic: String, _ state: inout TopicState, _ actions: inout [Action]) {
        guard !state.waiters.isEmpty, let position = state.position else { return }
        let readDone = state.read == nil
        state.waiters.removeAll { waiter in
            let answered =
                position.epoch != waiter.epoch || position.seq >= waiter.seq || (waiter.expired && readDone)
            if answered { actions.append(.answer(topic: topic, waiter: waiter.id)) }
            return answered
        }
    }
}
