// Tests of `--max-history-bytes` (HistoryBytes.swift): the byte count is exact through every way a
// topic's frames change, eviction takes history of the topics idle longest first and keeps each
// topic's newest event, forgets whole topics (never a subscribed one) only when newest events alone
// are over, stops at 90 % of the cap, and costs O(1) amortised per event (counted, not timed).

import NIOCore
import Testing

@testable import RelayHub

// MARK: - Helpers (`seq(of:)` is in HubTestSupport.swift)

private func makeHub(
    historyLimit: Int = 100, maxTopics: Int = 100_000, topicTTL: UInt64 = 3600 * 1_000_000_000,
    cap: Int = 1 << 40, overhead: Int = 0, frameOverhead: Int = 0, sequencing: HubSequencing = .local
) -> Hub {
    Hub(
        configuration: HubConfiguration(
            historyLimit: historyLimit, maxTopics: maxTopics, topicTTL: topicTTL, sequencing: sequencing,
            maxHistoryBytes: cap, topicOverheadBytes: overhead, frameOverheadBytes: frameOverhead),
        epochPrefix: "test")
}

/// Smaller than HubTestSupport's `object` (no `type`), so byte caps in these tests stay small.
private func smallObject(_ topic: String, _ n: Int) -> String { #"{"topic":"\#(topic)","n":\#(n)}"# }

private func smallEvent(_ topic: String, _ n: Int) -> IncomingEvent {
    IncomingEvent(topic: topic, object: ByteBuffer(string: smallObject(topic, n)))
}

/// The size of the frame the hub builds for `object` numbered `seq`, worked out from the format
/// (docs/protocol.md: `{"seq":N,` then the object after its `{`, in a text frame), not from the hub.
private func frameBytes(seq: UInt64, _ object: String) -> Int {
    let payload = "{\"seq\":\(seq),".utf8.count + object.utf8.count - 1
    return payload + (payload < 126 ? 2 : payload <= 0xFFFF ? 4 : 10)
}

/// Every buffer the hub holds, each once (by address: a topic's newest is its ring's last frame),
/// plus the overhead of each topic: what `historyBytes` must say.
private func recount(_ hub: Hub) -> Int {
    var seen = Set<UInt>()
    var total = 0
    for topic in hub.topics.values {
        total += hub.configuration.topicOverheadBytes
        for frame in topic.history.all + (topic.newest.map { [$0] } ?? []) {
            let address = frame.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
            if seen.insert(address).inserted { total += frame.readableBytes + hub.configuration.frameOverheadBytes }
        }
    }
    return total
}

/// The seqs of the frames a topic's ring holds, oldest first.
private func heldSeqs(_ hub: Hub, _ name: String) -> [UInt64] {
    hub.topics[name]?.history.all.compactMap(seq(of:)) ?? []
}

private func sub(_ serial: UInt64) -> SubscriberID { SubscriberID(loop: 0, serial: serial) }

/// Publishes `count` events to each of `topics`, one topic after another (the first is idle longest).
private func fill(_ hub: Hub, topics: [String], count: Int, now: UInt64 = 1) {
    for name in topics {
        _ = hub.publish((1...count).map { smallEvent(name, $0) }, now: now)
    }
}

// MARK: - Accounting

@Suite("--max-history-bytes: accounting")
struct HistoryBytesAccountingTests {
    @Test("publish, ring wrap, a topic made by a subscribe: frames counted once each, plus the overhead")
    func publishAndWrap() {
        let hub = makeHub(historyLimit: 3, overhead: 100)
        _ = hub.publish([smallEvent("a", 1)], now: 1)
        #expect(hub.historyBytes == 100 + frameBytes(seq: 1, smallObject("a", 1)))
        #expect(hub.historyBytes == recount(hub))

        // Seqs 2...5: the ring wraps, keeping 3, 4, 5; the newest is one of them, counted once.
        _ = hub.publish((2...5).map { smallEvent("a", $0) }, now: 2)
        let a = (3...5).reduce(0) { $0 + frameBytes(seq: UInt64($1), smallObject("a", $1)) }
        #expect(hub.historyBytes == 100 + a)
        #expect(hub.historyBytes == recount(hub))

        _ = hub.subscribe(sub(1), to: "c", resume: nil, now: 3)
        #expect(hub.historyBytes == 200 + a)
        _ = hub.publish([smallEvent("b", 1)], now: 4)
        #expect(hub.historyBytes == 300 + a + frameBytes(seq: 1, smallObject("b", 1)))
        #expect(hub.historyBytes == recount(hub))
    }

    @Test("each frame held counts its overhead once: ring wrap, history 0, eviction")
    func frameOverhead() {
        let hub = makeHub(historyLimit: 3, cap: 2000, overhead: 100, frameOverhead: 50)
        _ = hub.publish((1...5).map { smallEvent("a", $0) }, now: 1)
        let frames: Int = (3...5).reduce(0) { $0 + frameBytes(seq: UInt64($1), smallObject("a", $1)) }
        #expect(hub.historyBytes == 100 + 3 * 50 + frames)
        #expect(hub.historyBytes == recount(hub))
        for round in 1...20 { _ = hub.publish((0..<10).map { smallEvent("t\($0)", round) }, now: UInt64(round)) }
        #expect(hub.historyEvictions != HistoryEvictions())
        #expect(hub.historyBytes <= 2000)
        #expect(hub.historyBytes == recount(hub))

        let newestOnly = makeHub(historyLimit: 0, overhead: 7, frameOverhead: 50)
        _ = newestOnly.publish([smallEvent("a", 1), smallEvent("a", 2)], now: 1)
        #expect(newestOnly.historyBytes == 7 + 50 + frameBytes(seq: 2, smallObject("a", 2)))
    }

    @Test("history 0: the newest event alone is counted, and replaced")
    func historyZero() {
        let hub = makeHub(historyLimit: 0, overhead: 7)
        _ = hub.publish([smallEvent("a", 1), smallEvent("a", 22)], now: 1)
        #expect(hub.historyBytes == 7 + frameBytes(seq: 2, smallObject("a", 22)))
        #expect(hub.historyBytes == recount(hub))
    }

    @Test("a topic forgotten by --max-topics or --topic-ttl takes its bytes with it")
    func forgetAndExpire() {
        let limited = makeHub(historyLimit: 5, maxTopics: 2, overhead: 50)
        fill(limited, topics: ["x", "y", "z"], count: 4)
        #expect(limited.topics["x"] == nil)
        let yz = (1...4).reduce(0) { $0 + frameBytes(seq: UInt64($1), smallObject("y", $1)) + frameBytes(seq: UInt64($1), smallObject("z", $1)) }
        #expect(limited.historyBytes == 100 + yz)
        #expect(limited.historyBytes == recount(limited))

        let expiring = makeHub(topicTTL: 10, overhead: 50)
        fill(expiring, topics: ["p", "q"], count: 3, now: 0)
        #expect(expiring.expire(now: 100) == 2)
        #expect(expiring.historyBytes == 0)
    }

    @Test("restore counts what it restores, the newest sharing the ring's last frame")
    func restore() {
        let first = makeHub(historyLimit: 4, overhead: 10)
        fill(first, topics: ["a", "b"], count: 6)
        let second = makeHub(historyLimit: 4, overhead: 10)
        second.restore(first.snapshot(), now: 1)
        #expect(second.historyBytes == first.historyBytes)
        #expect(second.historyBytes == recount(second))
    }

    @Test("cluster mode: sequenced events and resets are counted alike")
    func clusterMode() throws {
        let hub = makeHub(historyLimit: 3, overhead: 10, sequencing: .external)
        _ = try hub.publishSequenced(
            (1...5).map { SequencedEvent(topic: "a", epoch: "e1", seq: UInt64($0), object: ByteBuffer(string: smallObject("a", $0))) },
            now: 1)
        #expect(hub.historyBytes == recount(hub))
        _ = try hub.resetTopic(
            "a", epoch: "e2", newestSeq: 2,
            events: (1...2).map { StoredEvent(seq: UInt64($0), object: ByteBuffer(string: smallObject("a", $0))) }, now: 2)
        #expect(hub.historyBytes == 10 + frameBytes(seq: 1, smallObject("a", 1)) + frameBytes(seq: 2, smallObject("a", 2)))
        #expect(hub.historyBytes == recount(hub))
        _ = try hub.resetTopic("b", epoch: "e1", newestSeq: 9, events: [StoredEvent(seq: 9, object: ByteBuffer(string: smallObject("b", 9)))], now: 3)
        #expect(hub.historyBytes == recount(hub))
        #expect(hub.forgetTopic("a"))
        #expect(hub.historyBytes == 10 + frameBytes(seq: 9, smallObject("b", 9)))
    }
}

// MARK: - Eviction

@Suite("--max-history-bytes: eviction")
struct HistoryBytesEvictionTests {
    /// Five topics t0...t4 (t0 idle longest) of 8 events each, and a cap they just fit.
    private func fullHub(overhead: Int = 0) -> (Hub, cap: Int) {
        let names = (0..<5).map { "t\($0)" }
        var cap = 5 * overhead
        for name in names { for n in 1...8 { cap += frameBytes(seq: UInt64(n), smallObject(name, n)) } }
        let hub = makeHub(cap: cap, overhead: overhead)
        fill(hub, topics: names, count: 8)
        #expect(hub.historyBytes == cap)
        #expect(hub.historyEvictions == HistoryEvictions())
        return (hub, cap)
    }

    @Test("over the cap: the oldest history of the topic idle longest goes first; newest events and topics stay")
    func idleLongestFirst() {
        let (hub, cap) = fullHub()
        let target = cap - cap / 10
        _ = hub.publish([smallEvent("t4", 9)], now: 2)

        // t0 lost its oldest events, just enough; t1...t4 kept everything.
        let kept = heldSeqs(hub, "t0")
        #expect(kept.last == 8)
        #expect(kept == Array((9 - UInt64(kept.count))...8))
        for name in ["t1", "t2", "t3"] { #expect(heldSeqs(hub, name) == Array(1...8)) }
        #expect(heldSeqs(hub, "t4") == Array(1...9))
        #expect(hub.historyEvictions == HistoryEvictions(events: 8 - kept.count, topics: 0))
        #expect(hub.historyBytes <= target)
        #expect(hub.historyBytes == recount(hub))
    }

    @Test("eviction stops at 90 % of the cap: one frame fewer dropped would leave it above")
    func stopsAtNinetyPercent() {
        let (hub, cap) = fullHub(overhead: 3)
        let target = cap - cap / 10
        _ = hub.publish([smallEvent("t4", 9)], now: 2)
        let firstKept = heldSeqs(hub, "t0").first!
        let lastDropped = frameBytes(seq: firstKept - 1, smallObject("t0", Int(firstKept) - 1))
        #expect(hub.historyBytes <= target)
        #expect(hub.historyBytes + lastDropped > target)

        // Under the cap again nothing more is evicted: eviction runs in batches, not per event.
        let before = hub.historyEvictions
        _ = hub.publish([smallEvent("t3", 9)], now: 3)
        #expect(hub.historyBytes <= cap)
        #expect(hub.historyEvictions == before)
    }

    @Test("history goes before any topic, across topics in idle order, and the most recent topic keeps its history")
    func acrossTopics() {
        let (hub, cap) = fullHub()
        // A burst on t4 worth half the cap: t0, t1, ... lose history in that order.
        _ = hub.publish((9...20).map { smallEvent("t4", $0) }, now: 2)
        #expect(hub.historyEvictions.topics == 0)
        #expect(hub.topics.count == 5)
        #expect(hub.historyBytes <= cap - cap / 10)
        let held = (0..<4).map { heldSeqs(hub, "t\($0)").count }
        // Idle longest loses most: counts never decrease from t0 to t3, and each keeps its newest.
        #expect(held == held.sorted())
        #expect(held[0] == 1)
        for n in 0..<4 { #expect(heldSeqs(hub, "t\(n)").last == 8) }
        #expect(heldSeqs(hub, "t4") == Array(1...20))
    }

    @Test("newest events alone over the cap: whole topics are forgotten, idle longest first, never a subscribed one")
    func forgetsWholeTopics() {
        // 20 topics of one event each, t0 idle longest; t1 has a subscriber.
        let names = (0..<20).map { "t\($0)" }
        let sizes = names.map { frameBytes(seq: 1, smallObject($0, 1)) + 10 }
        let cap = sizes.prefix(10).reduce(0, +)
        let hub = makeHub(cap: cap, overhead: 10)
        _ = hub.subscribe(sub(1), to: "t1", resume: nil, now: 0)
        for (index, name) in names.enumerated() {
            _ = hub.publish([smallEvent(name, 1)], now: UInt64(index + 1))
            #expect(hub.historyBytes <= cap)
        }
        #expect(hub.historyEvictions.events == 0)
        #expect(hub.historyEvictions.topics > 0)
        #expect(hub.topics["t1"] != nil)
        // The topics kept are t1 and the most recent ones: every forgotten one was idle longer than every kept one.
        let kept = names.filter { hub.topics[$0] != nil && $0 != "t1" }
        let forgotten = names.filter { hub.topics[$0] == nil }
        #expect(forgotten.count == hub.historyEvictions.topics)
        #expect(kept == Array(names.suffix(kept.count)))
        #expect(hub.historyBytes == recount(hub))
    }

    @Test("a resume into an evicted range gets recovered:false and the newest event; one after it still recovers")
    func resumeIntoEvictedRange() throws {
        let (hub, _) = fullHub()
        let epoch = hub.topics["t0"]!.epoch
        _ = hub.publish([smallEvent("t4", 9)], now: 2)
        let firstKept = try #require(heldSeqs(hub, "t0").first)
        #expect(firstKept > 1)

        let evicted = hub.subscribe(sub(1), to: "t0", resume: ResumePoint(epoch: epoch, since: 0), now: 3)
        #expect(evicted.recovered == false)
        #expect(evicted.seq == 8)
        #expect(evicted.frames.compactMap(seq(of:)) == [8])

        let held = hub.subscribe(sub(2), to: "t0", resume: ResumePoint(epoch: epoch, since: firstKept - 1), now: 3)
        #expect(held.recovered == true)
        #expect(held.frames.compactMap(seq(of:)) == Array(firstKept...8))
    }

    @Test("100,000 publishes over a full cap: eviction work grows linearly, never with topics × events")
    func amortised() {
        let hub = makeHub(historyLimit: 100, cap: 256 * 1024, overhead: 64)
        var events = 0
        // Many topics, revisited: history, then whole topics, are evicted over and over.
        for round in 0..<100 {
            var batch = [IncomingEvent]()
            for index in 0..<1000 {
                batch.append(smallEvent("topic-\((index * 7 + round * 13) % 5000)", round))
            }
            _ = hub.publish(batch, now: UInt64(round))
            events += batch.count
            #expect(hub.historyBytes <= hub.configuration.maxHistoryBytes)
        }
        #expect(events == 100_000)
        #expect(hub.historyEvictions.events > 1000)
        #expect(hub.historyEvictions.topics > 1000)
        #expect(hub.evictionWork <= 4 * events)
        #expect(hub.historyBytes == recount(hub))
    }

    @Test("subscribed topics whose newest events exceed the cap: each publish does O(1) eviction work and keeps them")
    func subscribedOverTheCap() {
        let hub = makeHub(cap: 4096, overhead: 64)
        let names = (0..<200).map { "s\($0)" }
        for (index, name) in names.enumerated() { _ = hub.subscribe(sub(UInt64(index)), to: name, resume: nil, now: 0) }
        var events = 0
        for round in 1...100 {
            for name in names {
                _ = hub.publish([smallEvent(name, round)], now: UInt64(round))
                events += 1
            }
        }
        #expect(hub.topics.count == names.count)
        for name in names { #expect(heldSeqs(hub, name) == [100]) }
        #expect(hub.evictionWork <= 4 * events)
        #expect(hub.historyBytes == recount(hub))
    }
}
