// Tests of the Hub's history and resume: what a subscribe with and without a resume point replays,
// the history window, epochs.

import NIOCore
import Testing

@testable import RelayHub

@Suite("Hub: history and resume")
struct HubHistoryTests {
    /// A hub with `count` events on "task:1", and their frames in order.
    private func filled(historyLimit: Int, count: Int) -> (Hub, [ByteBuffer], String) {
        let hub = makeHub(historyLimit: historyLimit)
        let recorder = sub(0, 999)
        let first = hub.subscribe(recorder, to: "task:1", resume: nil, now: 0)
        var frames: [ByteBuffer] = []
        for n in 1...count {
            let plan = hub.publish([event("task:1", n)], now: UInt64(n))
            frames += runs(plan.loops[0]).flatMap(\.frames)
        }
        hub.unsubscribe(recorder, from: "task:1", now: UInt64(count))
        return (hub, frames, first.epoch ?? "")
    }

    @Test("resume inside the window replays exactly the missed frames, in order")
    func resumeInsideWindow() throws {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 12)
        #expect(frames.count == 12)

        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: 9), now: 100)
        #expect(answer.epoch == epoch)
        #expect(answer.seq == 12)
        #expect(answer.recovered)
        #expect(answer.frames.map(bytes) == frames[9...].map(bytes))
        #expect(seqs(answer.frames) == [10, 11, 12])

        // The oldest resumable point: history holds seq 8...12, so since 7 still recovers all five.
        let oldest = hub.subscribe(sub(0, 2), to: "task:1", resume: ResumePoint(epoch: epoch, since: 7), now: 100)
        #expect(oldest.recovered)
        #expect(seqs(oldest.frames) == [8, 9, 10, 11, 12])
        #expect(oldest.frames.map(bytes) == frames[7...].map(bytes))
    }

    @Test("resume at the newest seq: recovered, nothing to send")
    func resumeAtNewest() {
        let (hub, _, epoch) = filled(historyLimit: 5, count: 12)
        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: 12), now: 100)
        #expect(answer.recovered)
        #expect(answer.seq == 12)
        #expect(answer.frames.isEmpty)
    }

    @Test("resume older than the window: not recovered, newest only")
    func resumeOlderThanWindow() throws {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 12)
        for since: UInt64 in [0, 1, 6] {
            let answer = hub.subscribe(
                sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: since), now: 100)
            #expect(!answer.recovered, "since \(since)")
            #expect(answer.seq == 12)
            #expect(answer.frames.map(bytes) == [bytes(frames[11])], "since \(since)")
        }
    }

    @Test("history keeps exactly historyLimit events")
    func historyKeepsExactlyTheLimit() {
        for limit in [1, 2, 5, 100] {
            let (hub, _, epoch) = filled(historyLimit: limit, count: limit + 3)
            let total = UInt64(limit + 3)
            let edge = hub.subscribe(
                sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: total - UInt64(limit)), now: 100)
            #expect(edge.recovered, "limit \(limit)")
            #expect(edge.frames.count == limit, "limit \(limit)")
            let beyond = hub.subscribe(
                sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: total - UInt64(limit) - 1),
                now: 100)
            #expect(!beyond.recovered, "limit \(limit)")
            #expect(beyond.frames.count == 1, "limit \(limit)")
            #expect(hub.snapshot().first?.history.count == limit)
        }
    }

    @Test("resume with since 0 while history still holds seq 1: everything is replayed")
    func resumeFromZero() {
        let (hub, frames, epoch) = filled(historyLimit: 10, count: 4)
        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: 0), now: 100)
        #expect(answer.recovered)
        #expect(answer.frames.map(bytes) == frames.map(bytes))
    }

    @Test("resume with another epoch: not recovered, newest only")
    func wrongEpoch() {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 12)
        let answer = hub.subscribe(
            sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch + "x", since: 11), now: 100)
        #expect(!answer.recovered)
        #expect(answer.epoch == epoch)
        #expect(answer.frames.map(bytes) == [bytes(frames[11])])
    }

    @Test("resume with since beyond the newest seq: not recovered, newest only")
    func sinceInTheFuture() {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 3)
        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: ResumePoint(epoch: epoch, since: 7), now: 100)
        #expect(!answer.recovered)
        #expect(answer.frames.map(bytes) == [bytes(frames[2])])
    }

    @Test("history 0 still keeps the newest event")
    func historyZero() {
        let (hub, frames, epoch) = filled(historyLimit: 0, count: 3)
        let plain = hub.subscribe(sub(0, 1), to: "task:1", resume: nil, now: 100)
        #expect(!plain.recovered)
        #expect(plain.seq == 3)
        #expect(plain.frames.map(bytes) == [bytes(frames[2])])

        let missed = hub.subscribe(sub(0, 2), to: "task:1", resume: ResumePoint(epoch: epoch, since: 2), now: 100)
        #expect(!missed.recovered)
        #expect(missed.frames.map(bytes) == [bytes(frames[2])])

        let current = hub.subscribe(sub(0, 3), to: "task:1", resume: ResumePoint(epoch: epoch, since: 3), now: 100)
        #expect(current.recovered)
        #expect(current.frames.isEmpty)

        let state = hub.snapshot()
        #expect(state.count == 1)
        #expect(state.first?.history.isEmpty == true)
        #expect(state.first?.newest.map(bytes) == Array(expectedPayload(seq: 3, object: object("task:1", 3))))
    }

    @Test("plain subscribe: subscribed with the newest seq, then the newest event")
    func plainSubscribeGetsNewest() {
        let (hub, frames, epoch) = filled(historyLimit: 5, count: 4)
        let answer = hub.subscribe(sub(0, 1), to: "task:1", resume: nil, now: 100)
        #expect(answer.epoch == epoch)
        #expect(answer.seq == 4)
        #expect(!answer.recovered)
        #expect(answer.frames.map(bytes) == [bytes(frames[3])])
    }

    @Test("subscribing to a topic with no event: its epoch, seq 0, no frames")
    func newTopicOnSubscribe() {
        let hub = makeHub()
        let answer = hub.subscribe(sub(0, 1), to: "task:new", resume: nil, now: 0)
        #expect(answer.epoch != nil)
        #expect(answer.epoch?.isEmpty == false)
        #expect(answer.seq == 0)
        #expect(!answer.recovered)
        #expect(answer.frames.isEmpty)
        #expect(hub.counts == HubCounts(topics: 1, subscriptions: 1, patterns: 0))

        // The first event then gets seq 1 in that same epoch, and is delivered live.
        let plan = hub.publish([event("task:new", 1)], now: 1)
        #expect(deliveries(plan).map(\.1) == [1])
        let again = hub.subscribe(sub(0, 2), to: "task:new", resume: nil, now: 2)
        #expect(again.epoch == answer.epoch)
        #expect(again.seq == 1)
    }

    @Test("every topic gets its own epoch")
    func epochsDiffer() {
        let hub = makeHub()
        _ = hub.publish([event("a"), event("b")], now: 0)
        let a = hub.subscribe(sub(0, 1), to: "a", resume: nil, now: 1).epoch
        let b = hub.subscribe(sub(0, 1), to: "b", resume: nil, now: 1).epoch
        #expect(a != nil && b != nil && a != b)
    }
}
