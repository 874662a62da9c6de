// Tests of the Hub in cluster mode: events numbered elsewhere (by the Redis script), applied with
// `publishSequenced`, topics joined and reset with `resetTopic`, subscriptions with `subscribeIfHeld`.
//
// `FakeSequencer` plays Redis: it numbers each topic's events as the script does, keeps a bounded
// history, and can restart with or without its data, after which every topic takes a new epoch on
// its next touch (the run_id rule of issue 13).

import NIOCore
import Testing

@testable import RelayHub

// MARK: - Helpers (the rest are in HubTestSupport.swift)

/// Hands out (epoch, seq) per topic and keeps history, like the issue 13 script in `pub` and `read` mode.
private struct FakeSequencer {
    private struct Stored {
        var epoch: String
        var seq: UInt64
        var run: Int
        var history: [StoredEvent]
    }

    let historyLimit: Int
    private var run = 1
    private var epochSerial = 0
    private var topics: [String: Stored] = [:]

    init(historyLimit: Int = 100) { self.historyLimit = historyLimit }

    /// `pub`: the next seq of the topic, appended to its history.
    mutating func publish(_ topic: String, _ object: String) -> SequencedEvent {
        var stored = touch(topic)
        stored.seq += 1
        stored.history.append(StoredEvent(seq: stored.seq, object: ByteBuffer(string: object)))
        if stored.history.count > historyLimit { stored.history.removeFirst(stored.history.count - historyLimit) }
        topics[topic] = stored
        return SequencedEvent(topic: topic, epoch: stored.epoch, seq: stored.seq, object: ByteBuffer(string: object))
    }

    /// `read`: the topic's epoch, newest seq and history, oldest first.
    mutating func read(_ topic: String) -> (epoch: String, seq: UInt64, events: [StoredEvent]) {
        let stored = touch(topic)
        return (stored.epoch, stored.seq, stored.history)
    }

    /// A new server run: each topic starts a new epoch on its next touch, carrying its newest event
    /// as seq 1 — unless the data was lost, when there is nothing to carry.
    mutating func restart(losingData: Bool) {
        run += 1
        if losingData { topics = [:] }
    }

    private mutating func touch(_ topic: String) -> Stored {
        if let stored = topics[topic], stored.run == run { return stored }
        epochSerial += 1
        var fresh = Stored(epoch: "E\(epochSerial)", seq: 0, run: run, history: [])
        if let newest = topics[topic]?.history.last {
            fresh.seq = 1
            fresh.history = [StoredEvent(seq: 1, object: newest.object)]
        }
        topics[topic] = fresh
        return fresh
    }
}

private func makeClusterHub(historyLimit: Int = 100, maxTopics: Int = 100_000, loopCount: Int = 1) -> Hub {
    Hub(
        configuration: HubConfiguration(
            historyLimit: historyLimit, maxTopics: maxTopics, loopCount: loopCount, sequencing: .external),
        epochPrefix: "never-used")
}

/// A whole unmasked text frame carrying `payload` (RFC 6455 section 5.2; payloads here stay below 64 KiB).
private func textFrame(_ payload: String) -> [UInt8] {
    let bytes = Array(payload.utf8)
    let header: [UInt8] = bytes.count < 126
        ? [0x81, UInt8(bytes.count)] : [0x81, 126, UInt8(bytes.count >> 8), UInt8(bytes.count & 0xFF)]
    return header + bytes
}

/// The frame of `object` numbered `seq`: `{"seq":N,` + the object after its `{`.
private func eventFrame(seq: UInt64, _ object: String) -> [UInt8] {
    textFrame("{\"seq\":\(seq)," + object.dropFirst())
}

private func subscribedFrame(_ topic: String, epoch: String, seq: UInt64) -> [UInt8] {
    textFrame(#"{"op":"subscribed","topic":"\#(topic)","epoch":"\#(epoch)","seq":\#(seq),"recovered":false}"#)
}

/// Where a buffer's bytes live: equal for two buffers that share one storage.
private func address(_ buffer: ByteBuffer) -> UInt {
    buffer.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
}

/// What each subscriber is sent by a plan, in order, as raw frame bytes.
private func received(_ plan: FanOut) -> [SubscriberID: [[UInt8]]] {
    var out: [SubscriberID: [[UInt8]]] = [:]
    for loop in plan.loops {
        for run in runs(loop) {
            for id in run.subscribers { out[id, default: []] += run.frames.map(bytes) }
        }
    }
    return out
}

/// Joins `topic` as the cluster layer does for its first local subscriber: read, then reset.
@discardableResult
private func join(_ hub: Hub, _ redis: inout FakeSequencer, _ topic: String, now: UInt64 = 0) throws -> FanOut {
    let read = redis.read(topic)
    return try hub.resetTopic(topic, epoch: read.epoch, newestSeq: read.seq, events: read.events, now: now)
}

/// Subscribes a subscriber to a topic the hub holds (or a pattern); fails the test when the hub does not hold it.
@discardableResult
private func subscribe(
    _ hub: Hub, _ id: SubscriberID, _ name: String, resume: ResumePoint? = nil,
    sourceLocation: SourceLocation = #_sourceLocation
) throws -> Subscription {
    try #require(hub.subscribeIfHeld(id, to: name, resume: resume, now: 1), sourceLocation: sourceLocation)
}

/// Expects `body` to throw a `SequenceViolation` of `kind`, and returns it.
@discardableResult
private func expectViolation(
    _ kind: SequenceViolation.Kind, sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws(SequenceViolation) -> FanOut
) -> SequenceViolation? {
    do {
        let plan = try body()
        Issue.record("expected \(kind), got a plan of \(plan.deliveryCount) deliveries", sourceLocation: sourceLocation)
        return nil
    } catch {
        #expect(error.kind == kind, "\(error)", sourceLocation: sourceLocation)
        return error
    }
}

// MARK: - Applying events numbered elsewhere

@Suite("Hub, cluster mode: events numbered by Redis")
struct HubSequencedPublishTests {
    @Test("events reach exact and pattern subscribers with their external seq, byte-exact, grouped by loop")
    func fanOut() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub(loopCount: 2)
        let a = sub(0, 1)
        let b = sub(1, 2)
        let pattern = sub(0, 3)
        let both = sub(1, 4)  // holds task:1 and task:*: each event once
        _ = redis.publish("task:1", object("task:1", 0))  // emitted before any subscriber here
        try join(hub, &redis, "task:1")
        for (id, name) in [(a, "task:1"), (b, "task:1"), (both, "task:1"), (pattern, "task:*"), (both, "task:*")] {
            try subscribe(hub, id, name)
        }

        let batch = [
            redis.publish("task:1", object("task:1", 1)), redis.publish("task:1", object("task:1", 2)),
            redis.publish("task:2", object("task:2", 1)), redis.publish("job:1", object("job:1", 1)),
            redis.publish("task:1", object("task:1", 3)),
        ]
        #expect(batch.map(\.seq) == [2, 3, 1, 1, 4])
        let plan = try hub.publishSequenced(batch, now: 2)

        let t1 = [2, 3, 4].map { eventFrame(seq: UInt64($0), object("task:1", $0 - 1)) }
        let t2 = eventFrame(seq: 1, object("task:2", 1))
        let got = received(plan)
        #expect(got[a] == t1)
        #expect(got[b] == t1)
        #expect(got[both] == [t1[0], t1[1], t2, t1[2]])
        #expect(got[pattern] == [t1[0], t1[1], t2, t1[2]])
        #expect(got.count == 4, "nobody listens to job:1")
        #expect(plan.deliveryCount == 3 * 4 + 2, "task:1 to a, b, both and pattern; task:2 to both and pattern")

        // Grouped like `publish`: per loop, consecutive events of a topic share a run.
        #expect(plan.loops.count == 2)
        #expect(plan.loops[0].frames.count == 4, "each frame once per loop")
        #expect(runs(plan.loops[0]).map { Set($0.subscribers) } == [[a, pattern], [pattern], [a, pattern]])
        #expect(runs(plan.loops[0]).map(\.frames.count) == [2, 1, 1])
        #expect(runs(plan.loops[1]).map { Set($0.subscribers) } == [[b, both], [both], [b, both]])

        #expect(hub.position(of: "task:1") == TopicPosition(epoch: "E1", seq: 4))
        #expect(hub.position(of: "task:2") == TopicPosition(epoch: "E2", seq: 1))
        #expect(hub.position(of: "nothing") == nil)
    }

    @Test("each frame is built once: the same buffer on every loop, in history and as the newest")
    func builtOnce() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub(loopCount: 3)
        try join(hub, &redis, "t")
        for loop in 0..<3 { try subscribe(hub, sub(loop, UInt64(loop)), "t") }
        try subscribe(hub, sub(1, 9), "*")
        let batch = [redis.publish("t", object("t", 1)), redis.publish("t", object("t", 2))]
        let plan = try hub.publishSequenced(batch, now: 1)
        let perLoop = plan.loops.map { $0.frames.map(address) }
        #expect(perLoop[0].count == 2)
        #expect(perLoop[1] == perLoop[0] && perLoop[2] == perLoop[0])
        #expect(runs(plan.loops[1]).first?.subscribers.count == 2, "exact and pattern subscriber share one run")

        let replay = try subscribe(hub, sub(0, 10), "t", resume: ResumePoint(epoch: "E1", since: 0))
        #expect(replay.recovered)
        #expect(replay.frames.map(address) == perLoop[0])
        #expect(try subscribe(hub, sub(0, 11), "t").frames.map(address) == [perLoop[0][1]])
        #expect(try subscribe(hub, sub(0, 12), "t*").frames.map(address) == [perLoop[0][1]])
    }

    @Test("a topic the hub does not hold starts at its event: only what the ring holds is recovered")
    func unknownTopicStartsAtItsEvent() throws {
        var redis = FakeSequencer()
        for n in 1...9 { _ = redis.publish("task:7", object("task:7", n)) }
        let hub = makeClusterHub()
        try subscribe(hub, sub(0, 1), "task:*")
        let plan = try hub.publishSequenced([redis.publish("task:7", object("task:7", 10))], now: 1)
        #expect(received(plan)[sub(0, 1)] == [eventFrame(seq: 10, object("task:7", 10))])
        #expect(hub.position(of: "task:7") == TopicPosition(epoch: "E1", seq: 10))

        let inside = try subscribe(hub, sub(0, 2), "task:7", resume: ResumePoint(epoch: "E1", since: 9))
        #expect(inside.recovered && inside.seq == 10)
        #expect(inside.frames.map(bytes) == [eventFrame(seq: 10, object("task:7", 10))])
        let before = try subscribe(hub, sub(0, 3), "task:7", resume: ResumePoint(epoch: "E1", since: 8))
        #expect(!before.recovered)
        #expect(before.frames.map(bytes) == [eventFrame(seq: 10, object("task:7", 10))])
    }

    @Test("a repair is one batch: the missing events read from Redis, then the held one")
    func repairAsOneBatch() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub()
        try join(hub, &redis, "t")
        let watcher = sub(0, 1)
        try subscribe(hub, watcher, "t")
        _ = try hub.publishSequenced([redis.publish("t", object("t", 1))], now: 1)
        let lost = [redis.publish("t", object("t", 2)), redis.publish("t", object("t", 3))]
        let held = redis.publish("t", object("t", 4))

        // The held event alone is a gap: refused, nothing changes.
        expectViolation(.gap) { () throws(SequenceViolation) in try hub.publishSequenced([held], now: 2) }
        #expect(hub.position(of: "t")?.seq == 1)

        // The cluster layer reads what is missing (seq > newest) and applies it with the held event.
        let missing = redis.read("t").events.filter { $0.seq > 1 && $0.seq < held.seq }
        #expect(missing.map(\.seq) == lost.map(\.seq))
        let repair =
            missing.map { SequencedEvent(topic: "t", epoch: held.epoch, seq: $0.seq, object: $0.object) } + [held]
        let plan = try hub.publishSequenced(repair, now: 3)
        #expect(received(plan)[watcher] == (2...4).map { eventFrame(seq: UInt64($0), object("t", $0)) })
        #expect(runs(plan.loops[0]).count == 1, "one run: one write batch for the subscriber")
        let resumed = try subscribe(hub, sub(0, 2), "t", resume: ResumePoint(epoch: held.epoch, since: 1))
        #expect(resumed.recovered)
        #expect(resumed.frames.map(bytes) == (2...4).map { eventFrame(seq: UInt64($0), object("t", $0)) })
    }
}

// MARK: - History and resume

@Suite("Hub, cluster mode: joining, history and resume")
struct HubSequencedHistoryTests {
    @Test("a join seeds the ring from Redis; subscribe and resume answer from it as in single-relay mode")
    func joinThenResume() throws {
        var redis = FakeSequencer(historyLimit: 5)
        for n in 1...10 { _ = redis.publish("task:1", object("task:1", n)) }
        let hub = makeClusterHub(historyLimit: 5)
        #expect(hub.subscribeIfHeld(sub(0, 1), to: "task:1", resume: nil, now: 0) == nil, "not joined yet")
        #expect(hub.counts.subscriptions == 0, "a refused subscribeIfHeld registers nothing")

        let joined = try join(hub, &redis, "task:1")
        #expect(joined.deliveryCount == 0 && joined.loops.allSatisfy(\.isEmpty), "nobody here to tell")
        #expect(hub.position(of: "task:1") == TopicPosition(epoch: "E1", seq: 10))

        let plain = try subscribe(hub, sub(0, 1), "task:1")
        #expect(plain.epoch == "E1" && plain.seq == 10 && !plain.recovered)
        #expect(plain.frames.map(bytes) == [eventFrame(seq: 10, object("task:1", 10))])

        let inside = try subscribe(hub, sub(0, 2), "task:1", resume: ResumePoint(epoch: "E1", since: 7))
        #expect(inside.recovered)
        #expect(inside.frames.map(bytes) == (8...10).map { eventFrame(seq: UInt64($0), object("task:1", $0)) })
        let oldest = try subscribe(hub, sub(0, 3), "task:1", resume: ResumePoint(epoch: "E1", since: 5))
        #expect(oldest.recovered)
        #expect(oldest.frames.count == 5)
        let tooOld = try subscribe(hub, sub(0, 4), "task:1", resume: ResumePoint(epoch: "E1", since: 4))
        #expect(!tooOld.recovered)
        #expect(tooOld.frames.map(bytes) == [eventFrame(seq: 10, object("task:1", 10))])
        let otherEpoch = try subscribe(hub, sub(0, 5), "task:1", resume: ResumePoint(epoch: "E0", since: 9))
        #expect(!otherEpoch.recovered && otherEpoch.epoch == "E1")

        // Live events continue the ring.
        _ = try hub.publishSequenced((11...12).map { redis.publish("task:1", object("task:1", $0)) }, now: 2)
        let live = try subscribe(hub, sub(0, 6), "task:1", resume: ResumePoint(epoch: "E1", since: 10))
        #expect(live.recovered && live.seq == 12)
        #expect(live.frames.map(bytes) == (11...12).map { eventFrame(seq: UInt64($0), object("task:1", $0)) })
    }

    @Test("joining a topic with no event: seq 0, and the first event is seq 1 of that epoch")
    func joinEmptyTopic() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub()
        try join(hub, &redis, "quiet")
        let answer = try subscribe(hub, sub(0, 1), "quiet")
        #expect(answer.epoch == "E1" && answer.seq == 0 && answer.frames.isEmpty)
        let plan = try hub.publishSequenced([redis.publish("quiet", object("quiet", 1))], now: 1)
        #expect(received(plan)[sub(0, 1)] == [eventFrame(seq: 1, object("quiet", 1))])
    }

    @Test("joining a topic the hub holds at the same position tells nobody and fills its history")
    func joinOverHeldTopic() throws {
        var redis = FakeSequencer()
        for n in 1...9 { _ = redis.publish("task:3", object("task:3", n)) }
        let hub = makeClusterHub()
        let pattern = sub(0, 1)
        try subscribe(hub, pattern, "task:*")
        _ = try hub.publishSequenced([redis.publish("task:3", object("task:3", 10))], now: 1)  // kept for the pattern

        let plan = try join(hub, &redis, "task:3")
        #expect(plan.deliveryCount == 0 && plan.loops.allSatisfy(\.isEmpty))
        let resumed = try subscribe(hub, sub(0, 2), "task:3", resume: ResumePoint(epoch: "E1", since: 4))
        #expect(resumed.recovered, "the ring now holds what Redis had")
        #expect(resumed.frames.map(bytes) == (5...10).map { eventFrame(seq: UInt64($0), object("task:3", $0)) })
    }

    @Test("a join is never undone by the topic limit before its subscriber arrives")
    func joinSurvivesTopicLimit() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub(maxTopics: 1)
        try join(hub, &redis, "a")
        try subscribe(hub, sub(0, 1), "a")
        try join(hub, &redis, "b")
        #expect(try subscribe(hub, sub(0, 2), "b").epoch == "E2")
        #expect(hub.counts.topics == 2, "both have a subscriber")
    }

    @Test("with --history 0 a join still keeps the newest event")
    func joinHistoryZero() throws {
        var redis = FakeSequencer(historyLimit: 3)
        for n in 1...3 { _ = redis.publish("t", object("t", n)) }
        let hub = makeClusterHub(historyLimit: 0)
        try join(hub, &redis, "t")
        let answer = try subscribe(hub, sub(0, 1), "t", resume: ResumePoint(epoch: "E1", since: 2))
        #expect(!answer.recovered && answer.seq == 3)
        #expect(answer.frames.map(bytes) == [eventFrame(seq: 3, object("t", 3))])
        #expect(try subscribe(hub, sub(0, 2), "t", resume: ResumePoint(epoch: "E1", since: 3)).recovered)
    }
}

@Suite("Hub, cluster mode: forgetting topics and merging plans")
struct HubSequencedForgetTests {
    @Test("a topic no longer followed is forgotten unless it has exact subscribers; patterns do not hold it")
    func forgetTopic() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub()
        try join(hub, &redis, "a")
        try subscribe(hub, sub(0, 1), "a")
        try subscribe(hub, sub(0, 2), "a*")
        #expect(!hub.forgetTopic("a"), "an exact subscriber holds it")
        #expect(hub.position(of: "a") != nil)
        hub.unsubscribe(sub(0, 1), from: "a", now: 2)
        #expect(hub.forgetTopic("a"), "a pattern subscriber does not hold it")
        #expect(hub.position(of: "a") == nil)
        #expect(hub.subscribeIfHeld(sub(0, 3), to: "a", resume: nil, now: 3) == nil, "it must be joined again")
        #expect(!hub.forgetTopic("a"), "not held")
        // A forgotten topic is off the idle list too: expiring later must not trip over it.
        #expect(hub.expire(now: .max) == 0)
    }

    @Test("plans merged in order keep every frame once and each run's subscribers")
    func mergedPlans() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub(loopCount: 2)
        for topic in ["a", "b"] { try join(hub, &redis, topic) }
        try subscribe(hub, sub(0, 1), "a")
        try subscribe(hub, sub(1, 2), "b")
        try subscribe(hub, sub(1, 3), "a")
        var merged = try hub.publishSequenced([redis.publish("a", object("a", 1))], now: 1)
        let second = try hub.publishSequenced(
            [redis.publish("b", object("b", 1)), redis.publish("a", object("a", 2))], now: 1)
        for index in merged.loops.indices { merged.loops[index].append(contentsOf: second.loops[index]) }
        let got = received(merged)
        #expect(got[sub(0, 1)] == [eventFrame(seq: 1, object("a", 1)), eventFrame(seq: 2, object("a", 2))])
        #expect(got[sub(1, 3)] == [eventFrame(seq: 1, object("a", 1)), eventFrame(seq: 2, object("a", 2))])
        #expect(got[sub(1, 2)] == [eventFrame(seq: 1, object("b", 1))])
        #expect(merged.loops[1].frames.count == 3, "each frame once per loop")
    }
}

// MARK: - Violations

@Suite("Hub, cluster mode: refused batches and resets change nothing")
struct HubSequencedViolationTests {
    /// A hub holding "t" at E1/3 with a subscriber, and the frames it was sent.
    private func started() throws -> (Hub, FakeSequencer, [UInt8]) {
        var redis = FakeSequencer()
        let hub = makeClusterHub()
        try join(hub, &redis, "t")
        try subscribe(hub, sub(0, 1), "t")
        _ = try hub.publishSequenced((1...3).map { redis.publish("t", object("t", $0)) }, now: 1)
        return (hub, redis, eventFrame(seq: 3, object("t", 3)))
    }

    /// The hub's whole view of "t": position, the replay from since 0, the newest.
    private func state(_ hub: Hub) throws -> (TopicPosition?, [[UInt8]], [[UInt8]]) {
        let replay = try subscribe(hub, sub(0, 99), "t", resume: ResumePoint(epoch: "E1", since: 0))
        let plain = try subscribe(hub, sub(0, 99), "t")
        return (hub.position(of: "t"), replay.frames.map(bytes), plain.frames.map(bytes))
    }

    private func event(
        _ seq: UInt64, epoch: String = "E1", topic: String = "t", _ object: String? = nil
    ) -> SequencedEvent {
        SequencedEvent(
            topic: topic, epoch: epoch, seq: seq, object: ByteBuffer(string: object ?? #"{"topic":"t","x":\#(seq)}"#))
    }

    @Test(
        "a gap, a duplicate or another epoch is reported with where the topic stood",
        arguments: [
            (UInt64(5), "E1", SequenceViolation.Kind.gap),
            (UInt64(3), "E1", .duplicate),
            (UInt64(1), "E1", .duplicate),
            (UInt64(4), "E2", .otherEpoch),
            (UInt64(1), "E2", .otherEpoch),
        ])
    func singleViolations(seq: UInt64, epoch: String, kind: SequenceViolation.Kind) throws {
        let (hub, _, _) = try started()
        let before = try state(hub)
        let violation = expectViolation(kind) { () throws(SequenceViolation) in
            try hub.publishSequenced([event(seq, epoch: epoch)], now: 5)
        }
        #expect(violation?.topic == "t")
        #expect(violation?.index == 0)
        #expect(violation?.current == TopicPosition(epoch: "E1", seq: 3))
        #expect(violation?.claimed == TopicPosition(epoch: epoch, seq: seq))
        let after = try state(hub)
        #expect(after.0 == before.0 && after.1 == before.1 && after.2 == before.2)
    }

    @Test("a batch with one bad event is refused whole, even its valid events before it")
    func wholeBatchRefused() throws {
        let (hub, _, newest) = try started()
        let before = try state(hub)
        let violation = expectViolation(.duplicate) { () throws(SequenceViolation) in
            try hub.publishSequenced([event(4), event(1, topic: "u"), event(5), event(5)], now: 5)
        }
        #expect(violation?.index == 3)
        #expect(violation?.current == TopicPosition(epoch: "E1", seq: 5), "where the batch's own events left it")
        let after = try state(hub)
        #expect(after.0 == before.0 && after.1 == before.1 && after.2 == [newest])
        #expect(hub.position(of: "u") == nil)
        #expect(hub.counts.topics == 1)

        // And the same events without the bad one apply.
        let plan = try hub.publishSequenced([event(4), event(1, topic: "u"), event(5)], now: 6)
        #expect(received(plan)[sub(0, 1)]?.count == 2)
        #expect(hub.position(of: "t")?.seq == 5)
    }

    @Test(
        "data that cannot be framed is refused, not trapped on",
        arguments: ["", "{", "[1]", #"{"topic":"t""#, #" {"topic":"t"}"#])
    func malformedObject(text: String) throws {
        let (hub, _, _) = try started()
        let before = try state(hub)
        expectViolation(.malformed) { () throws(SequenceViolation) in
            try hub.publishSequenced([event(4, text)], now: 5)
        }
        expectViolation(.malformed) { () throws(SequenceViolation) in
            try hub.resetTopic(
                "t", epoch: "E9", newestSeq: 1, events: [StoredEvent(seq: 1, object: ByteBuffer(string: text))], now: 5)
        }
        let after = try state(hub)
        #expect(after.0 == before.0 && after.1 == before.1)
    }

    @Test("seq 0 or an invalid topic name for a topic the hub does not hold is refused")
    func malformedNewTopic() {
        let hub = makeClusterHub()
        expectViolation(.malformed) { () throws(SequenceViolation) in
            try hub.publishSequenced([event(0, topic: "new")], now: 0)
        }
        expectViolation(.malformed) { () throws(SequenceViolation) in
            try hub.publishSequenced([event(1, topic: "bad topic")], now: 0)
        }
        expectViolation(.malformed) { () throws(SequenceViolation) in
            try hub.resetTopic("a*", epoch: "E1", newestSeq: 0, events: [], now: 0)
        }
        #expect(hub.counts.topics == 0)
    }

    @Test("a reset whose history is not consecutive up to its newest seq is refused")
    func brokenHistory() throws {
        let (hub, _, _) = try started()
        let before = try state(hub)
        func stored(_ seqs: [UInt64]) -> [StoredEvent] {
            seqs.map { StoredEvent(seq: $0, object: ByteBuffer(string: #"{"topic":"t"}"#)) }
        }
        let cases: [(UInt64, [UInt64])] = [(5, [3, 4]), (5, [3, 5]), (5, [4, 5, 6]), (0, [1]), (2, [1, 2, 3]), (2, [2, 2])]
        for (newest, seqs) in cases {
            expectViolation(.brokenHistory) { () throws(SequenceViolation) in
                try hub.resetTopic("t", epoch: "E2", newestSeq: newest, events: stored(seqs), now: 5)
            }
        }
        let after = try state(hub)
        #expect(after.0 == before.0 && after.1 == before.1)
    }

    @Test("a reset to the topic's own epoch below its newest seq would reuse seqs: refused")
    func rewind() throws {
        let (hub, _, _) = try started()
        let before = try state(hub)
        let violation = expectViolation(.rewind) { () throws(SequenceViolation) in
            try hub.resetTopic(
                "t", epoch: "E1", newestSeq: 2,
                events: [StoredEvent(seq: 2, object: ByteBuffer(string: #"{"topic":"t"}"#))], now: 5)
        }
        #expect(violation?.current == TopicPosition(epoch: "E1", seq: 3))
        #expect(violation?.index == nil)
        let after = try state(hub)
        #expect(after.0 == before.0 && after.1 == before.1 && after.2 == before.2)
    }
}

// MARK: - Reset

@Suite("Hub, cluster mode: a topic reset")
struct HubSequencedResetTests {
    @Test("a reset sends each subscriber the repeated subscribed and the newest event; patterns the newest only")
    func resetNotifies() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub(loopCount: 2)
        let a = sub(0, 1)
        let b = sub(1, 2)
        let pattern = sub(0, 3)
        let both = sub(1, 4)
        try join(hub, &redis, "task:1")
        for (id, name) in [(a, "task:1"), (b, "task:1"), (both, "task:1"), (pattern, "task:*"), (both, "task:*")] {
            try subscribe(hub, id, name)
        }
        _ = try hub.publishSequenced((1...10).map { redis.publish("task:1", object("task:1", $0)) }, now: 1)

        // Redis restarts from a snapshot: a new epoch, the newest event carried as seq 1, then two more.
        redis.restart(losingData: false)
        let e2Events = [redis.publish("task:1", object("task:1", 11)), redis.publish("task:1", object("task:1", 12))]
        #expect(e2Events.map(\.epoch) == ["E2", "E2"])
        expectViolation(.otherEpoch) { () throws(SequenceViolation) in try hub.publishSequenced([e2Events[0]], now: 2) }

        let plan = try join(hub, &redis, "task:1", now: 3)
        // Every event of the new epoch follows (nothing Redis has is skipped), so the frame says 0.
        let subscribed = subscribedFrame("task:1", epoch: "E2", seq: 0)
        let newest = eventFrame(seq: 3, object("task:1", 12))
        let epoch2 = [eventFrame(seq: 1, object("task:1", 10)), eventFrame(seq: 2, object("task:1", 11)), newest]
        let got = received(plan)
        #expect(got[a] == [subscribed] + epoch2)
        #expect(got[b] == [subscribed] + epoch2)
        #expect(got[both] == [subscribed] + epoch2, "each event once, though it holds a pattern too")
        #expect(got[pattern] == epoch2)
        #expect(plan.deliveryCount == 3 + 4 * 3)

        // Two runs per loop: subscribed to the exact subscribers, then the events to everyone; each frame once.
        let loop0 = runs(plan.loops[0])
        #expect(loop0.map(\.subscribers) == [[a], [a, pattern]])
        #expect(plan.loops[0].frames.count == 4)
        let loop1 = runs(plan.loops[1])
        #expect(loop1.map { Set($0.subscribers) } == [[b, both], [b, both]])
        #expect(plan.loops[1].frames.map(address) == plan.loops[0].frames.map(address), "built once for every loop")

        // The ring is replaced: the old epoch no longer recovers; the new one does, inside its ring.
        #expect(hub.position(of: "task:1") == TopicPosition(epoch: "E2", seq: 3))
        let old = try subscribe(hub, sub(0, 5), "task:1", resume: ResumePoint(epoch: "E1", since: 9))
        #expect(!old.recovered && old.epoch == "E2" && old.seq == 3)
        #expect(old.frames.map(bytes) == [newest])
        let fresh = try subscribe(hub, sub(0, 6), "task:1", resume: ResumePoint(epoch: "E2", since: 1))
        #expect(fresh.recovered)
        #expect(fresh.frames.map(bytes) == [eventFrame(seq: 2, object("task:1", 11)), newest])
        #expect(
            fresh.frames.last.map(address) == plan.loops[0].frames.last.map(address), "the newest frame is the ring's")
        let carried = try subscribe(hub, sub(0, 7), "task:1", resume: ResumePoint(epoch: "E2", since: 0))
        #expect(carried.recovered)
        #expect(carried.frames.first.map(bytes) == eventFrame(seq: 1, object("task:1", 10)))

        // Live events go on in the new epoch; the old one is refused.
        let next = try hub.publishSequenced([redis.publish("task:1", object("task:1", 13))], now: 4)
        #expect(received(next)[a] == [eventFrame(seq: 4, object("task:1", 13))])
        expectViolation(.otherEpoch) { () throws(SequenceViolation) in
            try hub.publishSequenced(
                [
                    SequencedEvent(
                        topic: "task:1", epoch: "E1", seq: 11, object: ByteBuffer(string: object("task:1", 0)))
                ],
                now: 5)
        }
    }

    @Test("a reset to a topic that lost its data (seq 0) sends only the subscribed frame")
    func resetToNothing() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub(loopCount: 2)
        let a = sub(0, 1)
        let b = sub(1, 2)
        let pattern = sub(1, 3)
        try join(hub, &redis, "t")
        try subscribe(hub, a, "t")
        try subscribe(hub, b, "t")
        try subscribe(hub, pattern, "*")
        _ = try hub.publishSequenced((1...4).map { redis.publish("t", object("t", $0)) }, now: 1)

        redis.restart(losingData: true)
        let plan = try join(hub, &redis, "t", now: 2)
        let subscribed = subscribedFrame("t", epoch: "E2", seq: 0)
        let got = received(plan)
        #expect(got[a] == [subscribed])
        #expect(got[b] == [subscribed])
        #expect(got[pattern] == nil, "nothing is news to a pattern")
        #expect(plan.deliveryCount == 2)
        #expect(plan.loops.map { $0.frames.count } == [1, 1])

        let old = try subscribe(hub, sub(0, 4), "t", resume: ResumePoint(epoch: "E1", since: 4))
        #expect(!old.recovered && old.epoch == "E2" && old.seq == 0 && old.frames.isEmpty)
        let current = try subscribe(hub, sub(0, 5), "t", resume: ResumePoint(epoch: "E2", since: 0))
        #expect(current.recovered && current.frames.isEmpty)
        let first = try hub.publishSequenced([redis.publish("t", object("t", 5))], now: 3)
        #expect(received(first)[a] == [eventFrame(seq: 1, object("t", 5))])
    }

    @Test("a reset in the same epoch further on (history no longer covers the gap) also announces itself")
    func resetSameEpochAhead() throws {
        var redis = FakeSequencer(historyLimit: 3)
        let hub = makeClusterHub(historyLimit: 3)
        let a = sub(0, 1)
        try join(hub, &redis, "t")
        try subscribe(hub, a, "t")
        _ = try hub.publishSequenced([redis.publish("t", object("t", 1))], now: 1)
        for n in 2...9 { _ = redis.publish("t", object("t", n)) }  // missed here

        let read = redis.read("t")
        #expect(read.events.first?.seq == 7, "seq 2 is no longer in Redis: no repair possible")
        let plan = try hub.resetTopic("t", epoch: read.epoch, newestSeq: read.seq, events: read.events, now: 2)
        // What Redis still has (7...9) follows; the frame says the stream stands at 6.
        #expect(
            received(plan)[a]
                == [subscribedFrame("t", epoch: "E1", seq: 6)] + (7...9).map { eventFrame(seq: UInt64($0), object("t", $0)) })
        let resumed = try subscribe(hub, sub(0, 2), "t", resume: ResumePoint(epoch: "E1", since: 6))
        #expect(resumed.recovered)
        #expect(resumed.frames.map(bytes) == (7...9).map { eventFrame(seq: UInt64($0), object("t", $0)) })
        #expect(!(try subscribe(hub, sub(0, 3), "t", resume: ResumePoint(epoch: "E1", since: 1))).recovered)
    }

    @Test("with --history 0 a reset sends the newest event, and the frame stands just before it")
    func resetHistoryZero() throws {
        var redis = FakeSequencer(historyLimit: 5)
        let hub = makeClusterHub(historyLimit: 0)
        let a = sub(0, 1)
        try join(hub, &redis, "t")
        try subscribe(hub, a, "t")
        _ = try hub.publishSequenced([redis.publish("t", object("t", 1))], now: 1)
        redis.restart(losingData: true)
        for n in 2...4 { _ = redis.publish("t", object("t", n)) }
        let plan = try join(hub, &redis, "t", now: 2)
        #expect(received(plan)[a] == [subscribedFrame("t", epoch: "E2", seq: 2), eventFrame(seq: 3, object("t", 4))])
    }

    @Test("a reset of a topic that has only pattern subscribers sends them the new epoch's events")
    func resetPatternOnly() throws {
        var redis = FakeSequencer()
        let hub = makeClusterHub()
        let pattern = sub(0, 1)
        try subscribe(hub, pattern, "job:*")
        _ = try hub.publishSequenced([redis.publish("job:1", object("job:1", 1))], now: 1)
        redis.restart(losingData: false)
        let plan = try join(hub, &redis, "job:1", now: 2)
        #expect(received(plan) == [pattern: [eventFrame(seq: 1, object("job:1", 1))]])
        #expect(runs(plan.loops[0]).count == 1, "no subscribed frame without an exact subscriber")
    }
}

// MARK: - Frames and modes

@Suite("Hub, cluster mode: frames and modes")
struct HubSequencedModeTests {
    @Test("the subscribed frame is the same bytes as the server's answer to a subscription")
    func subscribedFrameBytes() {
        let frame = WebSocketText.subscribedFrame(topic: "task:1", epoch: "k3x9AbCdEfGh", seq: 17, recovered: false)
        #expect(
            bytes(frame)
                == textFrame(#"{"op":"subscribed","topic":"task:1","epoch":"k3x9AbCdEfGh","seq":17,"recovered":false}"#))
        let pattern = WebSocketText.subscribedFrame(topic: "task:*", epoch: nil, seq: 0, recovered: false)
        #expect(bytes(pattern) == textFrame(#"{"op":"subscribed","topic":"task:*","seq":0,"recovered":false}"#))
        let escaped = WebSocketText.subscribedFrame(topic: "t", epoch: "a\"b\\c\n\u{1}", seq: 1, recovered: true)
        #expect(
            bytes(escaped)
                == textFrame(#"{"op":"subscribed","topic":"t","epoch":"a\"b\\c\n\u0001","seq":1,"recovered":true}"#))
    }

    @Test("a hub numbers its own events unless it is told otherwise")
    func defaultMode() {
        #expect(HubConfiguration().sequencing == .local)
        #expect(makeClusterHub().configuration.sequencing == .external)
    }

    @Test("a cluster-mode hub never makes an epoch of its own")
    func clusterHubTrapsOnLocalNumbering() async {
        await #expect(processExitsWith: .failure) {
            let hub = Hub(configuration: HubConfiguration(sequencing: .external), epochPrefix: "x")
            _ = hub.publish([IncomingEvent(topic: "t", object: ByteBuffer(string: #"{"topic":"t"}"#))], now: 0)
        }
        await #expect(processExitsWith: .failure) {
            let hub = Hub(configuration: HubConfiguration(sequencing: .external), epochPrefix: "x")
            _ = hub.subscribe(SubscriberID(loop: 0, serial: 1), to: "t", resume: nil, now: 0)
        }
        await #expect(processExitsWith: .failure) {
            let hub = Hub(configuration: HubConfiguration(), epochPrefix: "x")
            _ = try? hub.publishSequenced(
                [SequencedEvent(topic: "t", epoch: "E", seq: 1, object: ByteBuffer(string: #"{"topic":"t"}"#))], now: 0)
        }
    }
}
