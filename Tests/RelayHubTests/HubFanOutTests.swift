// Tests of the Hub's fan-out plan: subscribers grouped by loop, consecutive events of a topic
// delivered together, subscribe and unsubscribe.

import NIOCore
import Testing

@testable import RelayHub

@Suite("Hub: fan-out plan")
struct HubFanOutTests {
    @Test("subscribers grouped by loop; consecutive events of a topic share one delivery")
    func groupedAndCoalesced() throws {
        let hub = makeHub(loopCount: 2)
        let a = sub(0, 1)
        let b = sub(1, 2)
        let c = sub(0, 3)
        let d = sub(1, 4)
        for id in [a, b, c] { _ = hub.subscribe(id, to: "t1", resume: nil, now: 0) }
        _ = hub.subscribe(d, to: "t2", resume: nil, now: 0)
        _ = hub.publish([event("t0", 0)], now: 0)  // nobody listens

        let plan = hub.publish(
            [event("t1", 1), event("t1", 2), event("t2", 1), event("t1", 3), event("t0", 1)], now: 1)
        try #require(plan.loops.count == 2)

        let loop0 = runs(plan.loops[0])
        try #require(loop0.count == 2)
        #expect(Set(loop0[0].subscribers) == [a, c])
        #expect(loop0[0].subscribers.count == 2)
        #expect(seqs(loop0[0].frames) == [1, 2])
        #expect(loop0[0].frames.map(topic(of:)) == ["t1", "t1"])
        #expect(Set(loop0[1].subscribers) == [a, c])
        #expect(seqs(loop0[1].frames) == [3])

        let loop1 = runs(plan.loops[1])
        try #require(loop1.count == 3)
        #expect(loop1[0].subscribers == [b])
        #expect(seqs(loop1[0].frames) == [1, 2])
        #expect(loop1[1].subscribers == [d])
        #expect(loop1[1].frames.map(topic(of:)) == ["t2"])
        #expect(seqs(loop1[1].frames) == [1])
        #expect(loop1[2].subscribers == [b])
        #expect(seqs(loop1[2].frames) == [3])

        // The same frame bytes go to both loops.
        #expect(loop0[0].frames.map(bytes) == loop1[0].frames.map(bytes))
        // t1: 3 events x 3 subscribers; t2: 1 x 1; t0: nobody.
        #expect(plan.deliveryCount == 10)
    }

    @Test("a batch nobody listens to has an empty plan")
    func nobodyListening() {
        let hub = makeHub(loopCount: 3)
        let plan = hub.publish([event("x", 1), event("y", 1)], now: 0)
        #expect(plan.loops.count == 3)
        #expect(plan.loops.allSatisfy { $0.isEmpty })
        #expect(plan.deliveryCount == 0)
    }

    @Test("a loop plan holds each frame once; one subscriber needs no array, several share the topic's")
    func loopPlanLayout() {
        let hub = makeHub(loopCount: 1)
        let a = sub(0, 1)
        let b = sub(0, 2)
        _ = hub.subscribe(a, to: "solo", resume: nil, now: 0)
        _ = hub.subscribe(a, to: "pair", resume: nil, now: 0)
        _ = hub.subscribe(b, to: "pair", resume: nil, now: 0)
        let plan = hub.publish([event("solo", 1), event("solo", 2), event("pair", 1), event("solo", 3)], now: 1)
        let loop = plan.loops[0]
        #expect(loop.frames.count == 4)
        #expect(loop.runs.map(\.end) == [2, 3, 4])
        #expect(loop.runs.map(\.targets) == [.one(a), .many([a, b]), .one(a)])
        #expect(plan.deliveryCount == 5)
    }

    @Test("subscribing twice to one topic still means one delivery per event")
    func doubleSubscribe() {
        let hub = makeHub()
        let a = sub(0, 1)
        _ = hub.subscribe(a, to: "t", resume: nil, now: 0)
        _ = hub.subscribe(a, to: "t", resume: nil, now: 0)
        #expect(hub.counts.subscriptions == 1)
        let plan = hub.publish([event("t", 1)], now: 1)
        #expect(plan.deliveryCount == 1)
        #expect(runs(plan.loops[0]).first?.subscribers == [a])
    }

    @Test("unsubscribe stops delivery")
    func unsubscribeStops() {
        let hub = makeHub(loopCount: 2)
        let a = sub(0, 1)
        let b = sub(1, 2)
        _ = hub.subscribe(a, to: "t", resume: nil, now: 0)
        _ = hub.subscribe(b, to: "t", resume: nil, now: 0)
        #expect(hub.publish([event("t", 1)], now: 1).deliveryCount == 2)

        #expect(hub.unsubscribe(a, from: "t", now: 2))
        #expect(!hub.unsubscribe(a, from: "t", now: 2), "a second unsubscribe holds nothing")
        #expect(!hub.unsubscribe(a, from: "never", now: 2))
        let plan = hub.publish([event("t", 2)], now: 3)
        #expect(plan.deliveryCount == 1)
        #expect(runs(plan.loops[0]).isEmpty)
        #expect(runs(plan.loops[1]).first?.subscribers == [b])
        #expect(hub.counts.subscriptions == 1)

        #expect(hub.unsubscribe(b, from: "t", now: 4))
        #expect(hub.publish([event("t", 3)], now: 5).deliveryCount == 0)
        #expect(hub.counts.subscriptions == 0)
    }

    @Test("unsubscribe(fromAll:) ends every subscription of a connection, patterns too")
    func unsubscribeFromAll() {
        let hub = makeHub(loopCount: 2)
        let gone = sub(1, 7)
        let stays = sub(0, 8)
        for name in ["t1", "t2", "job:*"] { _ = hub.subscribe(gone, to: name, resume: nil, now: 0) }
        _ = hub.subscribe(stays, to: "t1", resume: nil, now: 0)
        #expect(hub.counts == HubCounts(topics: 2, subscriptions: 4, patterns: 1))

        hub.unsubscribe(gone, fromAll: ["t1", "t2", "job:*", "not-held"], now: 1)
        #expect(hub.counts == HubCounts(topics: 2, subscriptions: 1, patterns: 0))
        let plan = hub.publish([event("t1", 1), event("t2", 1), event("job:1", 1)], now: 2)
        #expect(deliveries(plan).map(\.0) == [stays])
        #expect(plan.deliveryCount == 1)
    }
}
