// Tests of the Hub's pattern subscriptions: live events of matching topics, the snapshot of the
// newest event per matching topic and its bound.
//
// Contract references are to docs/protocol.md (the command line, ingest and delivery sections).

import NIOCore
import Testing

@testable import RelayHub

@Suite("Hub: pattern subscriptions")
struct HubPatternTests {
    @Test("a pattern gets live events of matching topics only")
    func liveEvents() {
        let hub = makeHub(loopCount: 2)
        let tasks = sub(0, 1)
        let everything = sub(1, 2)
        let tasksAnswer = hub.subscribe(tasks, to: "task:*", resume: nil, now: 0)
        let allAnswer = hub.subscribe(everything, to: "*", resume: nil, now: 0)
        #expect(tasksAnswer.epoch == nil && tasksAnswer.seq == 0 && !tasksAnswer.recovered)
        #expect(tasksAnswer.frames.isEmpty && allAnswer.frames.isEmpty)
        #expect(hub.counts == HubCounts(topics: 0, subscriptions: 2, patterns: 2))

        let plan = hub.publish(
            [event("task:1", 1), event("job:1", 1), event("task", 1), event("tasks:1", 1), event("task:", 1)],
            now: 1)
        let got = deliveries(plan)
        #expect(got.filter { $0.0 == tasks }.map(\.2) == ["task:1", "task:"])
        #expect(got.filter { $0.0 == everything }.map(\.2) == ["task:1", "job:1", "task", "tasks:1", "task:"])
        #expect(plan.deliveryCount == 7)

        // A topic that first appears after the pattern subscription is matched too.
        let later = hub.publish([event("task:new", 1)], now: 2)
        #expect(Set(deliveries(later).map(\.0)) == [tasks, everything])
    }

    @Test("pattern snapshot: the newest event of each matching topic, most recently updated first")
    func snapshotOrder() {
        let hub = makeHub()
        _ = hub.publish([event("job:1", 1)], now: 10)
        _ = hub.publish([event("task:1", 1)], now: 20)
        _ = hub.publish([event("task:2", 1)], now: 30)
        _ = hub.publish([event("task:1", 2)], now: 40)
        _ = hub.publish([event("task:3", 1)], now: 50)
        _ = hub.subscribe(sub(0, 9), to: "task:empty", resume: nil, now: 50)  // a topic with no event

        let tasks = hub.subscribe(sub(0, 1), to: "task:*", resume: nil, now: 60)
        #expect(tasks.epoch == nil)
        #expect(tasks.seq == 0)
        #expect(!tasks.recovered)
        #expect(tasks.frames.map(topic(of:)) == ["task:3", "task:1", "task:2"])
        #expect(seqs(tasks.frames) == [1, 2, 1])

        let all = hub.subscribe(sub(0, 2), to: "*", resume: nil, now: 60)
        #expect(all.frames.map(topic(of:)) == ["task:3", "task:1", "task:2", "job:1"])

        // A pattern takes no resume: the same snapshot, not recovered.
        let resumed = hub.subscribe(
            sub(0, 3), to: "task:*", resume: ResumePoint(epoch: "test-1", since: 0), now: 60)
        #expect(!resumed.recovered && resumed.epoch == nil && resumed.seq == 0)
        #expect(resumed.frames.map(topic(of:)) == ["task:3", "task:1", "task:2"])
    }

    @Test("pattern snapshot holds at most patternSnapshotLimit topics, the most recent")
    func snapshotLimit() {
        let hub = makeHub(patternSnapshotLimit: 3)
        for n in 0..<10 { _ = hub.publish([event("task:\(n)", n)], now: UInt64(100 + n)) }
        let answer = hub.subscribe(sub(0, 1), to: "task:*", resume: nil, now: 200)
        #expect(answer.frames.map(topic(of:)) == ["task:9", "task:8", "task:7"])
    }

    @Test("the default snapshot bound is 1000")
    func defaultSnapshotBound() {
        let hub = makeHub()
        #expect(hub.configuration.patternSnapshotLimit == 1000)
        for n in 0..<1200 { _ = hub.publish([event("t:\(n)", n)], now: UInt64(n + 1)) }
        let answer = hub.subscribe(sub(0, 1), to: "t:*", resume: nil, now: 5000)
        #expect(answer.frames.count == 1000)
        #expect(answer.frames.first.flatMap(topic(of:)) == "t:1199")
        #expect(answer.frames.last.flatMap(topic(of:)) == "t:200")
    }

    // Events of one publish batch share their `now`; the later one in the batch is still the more
    // recently updated. Contract 5: "the newest event of each matching topic (at most 1000, the most
    // recently updated first)".
    @Test("pattern snapshot orders topics updated in one batch by their order in the batch")
    func snapshotOrderWithinOneBatch() {
        let hub = makeHub()
        let names = (0..<30).map { "task:\($0)" }
        _ = hub.publish(names.map { event($0, 1) }, now: 7)
        let answer = hub.subscribe(sub(0, 1), to: "task:*", resume: nil, now: 8)
        #expect(answer.frames.map(topic(of:)) == names.reversed().map(Optional.some))
    }

    @Test("pattern snapshot limit within one batch keeps the topics updated last")
    func snapshotLimitWithinOneBatch() {
        let hub = makeHub(patternSnapshotLimit: 5)
        let names = (0..<50).map { "task:\($0)" }
        _ = hub.publish(names.map { event($0, 1) }, now: 7)
        _ = hub.publish([event("task:3", 2)], now: 7)
        let answer = hub.subscribe(sub(0, 1), to: "task:*", resume: nil, now: 8)
        #expect(answer.frames.map(topic(of:)) == ["task:3", "task:49", "task:48", "task:47", "task:46"])
    }

    @Test("a subscriber holding an exact and matching patterns is listed once per event")
    func listedOnce() {
        let hub = makeHub(loopCount: 2)
        let s = sub(1, 5)
        let other = sub(0, 6)
        _ = hub.subscribe(s, to: "task:1", resume: nil, now: 0)
        _ = hub.subscribe(s, to: "task:*", resume: nil, now: 0)
        _ = hub.subscribe(s, to: "*", resume: nil, now: 0)
        _ = hub.subscribe(other, to: "task:*", resume: nil, now: 0)

        let plan = hub.publish([event("task:1", 1), event("task:1", 2), event("task:2", 1)], now: 1)
        #expect(runs(plan.loops[1]).count == 2)
        #expect(runs(plan.loops[1])[0].subscribers == [s])
        #expect(seqs(runs(plan.loops[1])[0].frames) == [1, 2])
        #expect(runs(plan.loops[1])[1].subscribers == [s])
        #expect(runs(plan.loops[0]).map(\.subscribers) == [[other], [other]])
        #expect(plan.deliveryCount == 6)

        // Dropping the exact subscription leaves the patterns.
        hub.unsubscribe(s, from: "task:1", now: 2)
        #expect(hub.publish([event("task:1", 3)], now: 3).deliveryCount == 2)
        // Dropping the patterns leaves nothing for s.
        #expect(hub.unsubscribe(s, from: "task:*", now: 4))
        #expect(hub.unsubscribe(s, from: "*", now: 4))
        #expect(!hub.unsubscribe(s, from: "*", now: 4))
        let last = hub.publish([event("task:1", 4)], now: 5)
        #expect(deliveries(last).map(\.0) == [other])
    }

    @Test("unsubscribing a pattern stops its live events")
    func patternUnsubscribe() {
        let hub = makeHub()
        let p = sub(0, 1)
        _ = hub.subscribe(p, to: "job:*", resume: nil, now: 0)
        #expect(hub.publish([event("job:1", 1)], now: 1).deliveryCount == 1)
        #expect(hub.unsubscribe(p, from: "job:*", now: 2))
        #expect(hub.publish([event("job:1", 2)], now: 3).deliveryCount == 0)
        #expect(hub.counts == HubCounts(topics: 1, subscriptions: 0, patterns: 0))
    }
}
