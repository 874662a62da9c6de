// Tests of the Hub forgetting topics: `--max-topics` (longest idle first, never a subscribed topic)
// and `--topic-ttl`.

import Foundation
import NIOCore
import Testing

@testable import RelayHub

@Suite("Hub: max topics and TTL")
struct HubBoundsTests {
    @Test("beyond maxTopics the longest idle topics are forgotten")
    func maxTopicsForgetsLongestIdle() {
        let hub = makeHub(maxTopics: 10)
        for n in 0..<30 { _ = hub.publish([event("t\(n)", n)], now: UInt64(n)) }
        #expect(hub.counts.topics == 10)
        #expect(topicNames(hub) == Set((20..<30).map { "t\($0)" }))
    }

    @Test("an event makes a topic recently active again")
    func eventRefreshesActivity() {
        let hub = makeHub(maxTopics: 10)
        for n in 0..<10 { _ = hub.publish([event("t\(n)", n)], now: UInt64(n)) }
        _ = hub.publish([event("t0", 99)], now: 10)
        _ = hub.publish([event("t10", 1)], now: 11)
        #expect(hub.counts.topics == 10)
        #expect(!topicNames(hub).contains("t1"))
        #expect(topicNames(hub).contains("t0"))
    }

    @Test("a topic with a subscriber is never forgotten")
    func subscribedTopicKept() {
        let hub = makeHub(maxTopics: 10)
        _ = hub.subscribe(sub(0, 1), to: "t0", resume: nil, now: 0)
        for n in 0..<30 { _ = hub.publish([event("t\(n)", n)], now: UInt64(n)) }
        #expect(hub.counts.topics == 10)
        #expect(topicNames(hub) == Set(["t0"] + (21..<30).map { "t\($0)" }))
        // Also when the subscribed topic has no event at all.
        let empty = makeHub(maxTopics: 3)
        let first = empty.subscribe(sub(0, 1), to: "waiting", resume: nil, now: 0)
        for n in 0..<10 { _ = empty.publish([event("t\(n)", n)], now: UInt64(n + 1)) }
        #expect(empty.counts.topics == 3)
        let again = empty.subscribe(sub(0, 2), to: "waiting", resume: nil, now: 20)
        #expect(again.epoch == first.epoch)
    }

    @Test("a topic whose last subscriber left counts as idle from then")
    func unsubscribeStartsIdleness() {
        let hub = makeHub(maxTopics: 5)
        _ = hub.subscribe(sub(0, 1), to: "t0", resume: nil, now: 0)
        for n in 0..<5 { _ = hub.publish([event("t\(n)", n)], now: UInt64(n)) }
        hub.unsubscribe(sub(0, 1), from: "t0", now: 10)  // t0 is now the most recently active
        _ = hub.publish([event("t5", 5)], now: 11)
        _ = hub.publish([event("t6", 6)], now: 12)
        #expect(hub.counts.topics == 5)
        #expect(topicNames(hub) == ["t0", "t3", "t4", "t5", "t6"])
    }

    @Test("a forgotten topic that comes back gets a new epoch and restarts at seq 1")
    func forgottenTopicComesBack() throws {
        let hub = makeHub(maxTopics: 1)
        _ = hub.publish([event("a", 1), event("a", 2)], now: 1)
        let old = try #require(hub.subscribe(sub(0, 1), to: "a", resume: nil, now: 2).epoch)
        hub.unsubscribe(sub(0, 1), from: "a", now: 2)
        _ = hub.publish([event("b", 1)], now: 3)
        #expect(topicNames(hub) == ["b"])

        _ = hub.publish([event("a", 3)], now: 4)
        let back = hub.subscribe(sub(0, 1), to: "a", resume: ResumePoint(epoch: old, since: 2), now: 5)
        #expect(back.epoch != nil)
        #expect(back.epoch != old)
        #expect(back.seq == 1)
        #expect(!back.recovered)
        #expect(seqs(back.frames) == [1])
        #expect(back.frames.first.flatMap { decode($0)?.text } == #"{"seq":1,"topic":"a","type":"progress","n":3}"#)
    }

    @Test("topicTTL: a topic with no event and no subscriber for that long is forgotten")
    func ttlExpiry() {
        let hub = makeHub(topicTTL: 100)
        _ = hub.publish([event("a", 1)], now: 1000)
        _ = hub.publish([event("b", 1)], now: 1050)
        _ = hub.subscribe(sub(0, 1), to: "c", resume: nil, now: 1000)
        _ = hub.publish([event("c", 1)], now: 1000)

        #expect(hub.expire(now: 1099) == 0)
        #expect(hub.counts.topics == 3)
        #expect(hub.expire(now: 1100) == 1)  // exactly the TTL is "for this long"
        #expect(topicNames(hub) == ["b", "c"])
        #expect(hub.expire(now: 1149) == 0)
        #expect(hub.expire(now: 1150) == 1)
        #expect(topicNames(hub) == ["c"])

        // c has a subscriber: kept however long; once it leaves, the TTL runs from then.
        #expect(hub.expire(now: 1_000_000) == 0)
        hub.unsubscribe(sub(0, 1), from: "c", now: 2_000_000)
        #expect(hub.expire(now: 2_000_099) == 0)
        #expect(hub.expire(now: 2_000_100) == 1)
        #expect(hub.counts.topics == 0)
    }

    @Test("topicTTL: an event restarts the clock")
    func ttlRestartsOnEvent() {
        let hub = makeHub(topicTTL: 100)
        _ = hub.publish([event("d", 1)], now: 0)
        _ = hub.publish([event("d", 2)], now: 80)
        #expect(hub.expire(now: 150) == 0)
        #expect(hub.expire(now: 179) == 0)
        #expect(hub.expire(now: 180) == 1)
    }

    @Test("topicTTL: a topic that only had a subscriber expires after it leaves")
    func ttlTopicWithoutEvents() {
        let hub = makeHub(topicTTL: 100)
        let first = hub.subscribe(sub(0, 1), to: "quiet", resume: nil, now: 0)
        hub.unsubscribe(sub(0, 1), from: "quiet", now: 50)
        #expect(hub.expire(now: 149) == 0)
        #expect(hub.counts.topics == 1)
        #expect(hub.expire(now: 150) == 1)
        #expect(hub.counts.topics == 0)
        let again = hub.subscribe(sub(0, 1), to: "quiet", resume: nil, now: 200)
        #expect(again.epoch != first.epoch)
    }

    @Test("topicTTL: an expired topic that comes back gets a new epoch")
    func ttlNewEpoch() throws {
        let hub = makeHub(topicTTL: 10)
        _ = hub.publish([event("e", 1)], now: 0)
        let old = try #require(hub.subscribe(sub(0, 1), to: "e", resume: nil, now: 1).epoch)
        hub.unsubscribe(sub(0, 1), from: "e", now: 1)
        #expect(hub.expire(now: 11) == 1)
        _ = hub.publish([event("e", 2)], now: 12)
        let back = hub.subscribe(sub(0, 1), to: "e", resume: ResumePoint(epoch: old, since: 1), now: 13)
        #expect(back.epoch != old)
        #expect(back.seq == 1)
        #expect(!back.recovered)
    }

    // One million topics take about 10 s in a debug build on a 2-core machine, so by default the test
    // publishes 200,000 (about 2 s); set PROGRESS_RELAY_TEST_MILLION=1 for the full million.
    static let distinctTopics = ProcessInfo.processInfo.environment["PROGRESS_RELAY_TEST_MILLION"] == nil
        ? 200_000 : 1_000_000

    @Test("hundreds of thousands of distinct topics with maxTopics 1000 keep at most 1000 topics")
    func manyDistinctTopics() {
        let total = Self.distinctTopics
        let hub = makeHub(historyLimit: 1, maxTopics: 1000)
        let batch = 10_000
        // The hub never reads the topic back out of the object, so one shared buffer serves every event.
        let object = ByteBuffer(string: #"{"topic":"t","type":"progress"}"#)
        var n = 0
        var now: UInt64 = 0
        while n < total {
            var events: [IncomingEvent] = []
            events.reserveCapacity(batch)
            for k in n..<(n + batch) {
                events.append(IncomingEvent(topic: "t:" + String(k), object: object))
            }
            now += 1
            _ = hub.publish(events, now: now)
            n += batch
            if hub.counts.topics > 1000 {
                Issue.record("\(hub.counts.topics) topics after \(n) events")
                return
            }
        }
        #expect(hub.counts.topics == 1000)
        #expect(topicNames(hub) == Set((total - 1000..<total).map { "t:\($0)" }))
    }
}
