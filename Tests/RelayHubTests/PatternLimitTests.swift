// The relay-wide bound on pattern subscriptions (`--max-pattern-subscriptions-total`), kept by
// the hub where it keeps patterns: a pattern over it is refused, and the count is given back by
// unsubscribe and by a connection going away.

import NIOCore
import Testing

@testable import RelayHub

@Suite("Hub: relay-wide pattern bound")
struct PatternLimitTests {
    private func makeHub(limit: Int) -> Hub {
        Hub(configuration: HubConfiguration(loopCount: 2, maxPatternSubscriptions: limit), epochPrefix: "test")
    }

    private func id(_ loop: Int, _ serial: UInt64) -> SubscriberID { SubscriberID(loop: loop, serial: serial) }

    private func event(_ topic: String) -> IncomingEvent {
        IncomingEvent(topic: topic, object: ByteBuffer(string: #"{"topic":"\#(topic)"}"#))
    }

    @Test("the default is 10,000")
    func defaultBound() {
        #expect(HubConfiguration().maxPatternSubscriptions == 10_000)
    }

    @Test("patterns up to the bound are held; one more is refused and holds nothing")
    func refusesOverTheBound() {
        let hub = makeHub(limit: 3)
        #expect(!hub.subscribe(id(0, 1), to: "a:*", resume: nil, now: 0).refused)
        #expect(!hub.subscribe(id(1, 2), to: "a:*", resume: nil, now: 0).refused)
        #expect(!hub.subscribe(id(0, 1), to: "b:*", resume: nil, now: 0).refused)
        #expect(hub.patternSubscriptions == 3)

        _ = hub.publish([event("c:1")], now: 1)
        let refused = hub.subscribe(id(1, 3), to: "c:*", resume: nil, now: 1)
        #expect(refused.refused && refused.frames.isEmpty, "a refused pattern gets no snapshot")
        // A prefix others hold counts as one more too.
        #expect(hub.subscribe(id(1, 3), to: "a:*", resume: nil, now: 1).refused)
        #expect(hub.patternSubscriptions == 3)
        #expect(hub.counts == HubCounts(topics: 1, subscriptions: 3, patterns: 2))

        // Refused subscriptions deliver nothing.
        let plan = hub.publish([event("c:2")], now: 2)
        #expect(plan.deliveryCount == 0)
    }

    @Test("a pattern held already is not counted again")
    func sameTwice() {
        let hub = makeHub(limit: 1)
        #expect(!hub.subscribe(id(0, 1), to: "a:*", resume: nil, now: 0).refused)
        #expect(!hub.subscribe(id(0, 1), to: "a:*", resume: nil, now: 0).refused)
        #expect(hub.patternSubscriptions == 1)
    }

    @Test("exact subscriptions do not count")
    func exactDoNotCount() {
        let hub = makeHub(limit: 1)
        #expect(!hub.subscribe(id(0, 1), to: "a:*", resume: nil, now: 0).refused)
        for serial in 2...20 as ClosedRange<UInt64> {
            #expect(!hub.subscribe(id(0, serial), to: "t\(serial)", resume: nil, now: 0).refused)
        }
        #expect(hub.patternSubscriptions == 1)
    }

    @Test("unsubscribe gives the slot back; unsubscribing what was refused or not held does not")
    func releaseOnUnsubscribe() {
        let hub = makeHub(limit: 2)
        _ = hub.subscribe(id(0, 1), to: "a:*", resume: nil, now: 0)
        _ = hub.subscribe(id(0, 2), to: "b:*", resume: nil, now: 0)
        #expect(hub.subscribe(id(0, 3), to: "c:*", resume: nil, now: 0).refused)
        #expect(!hub.unsubscribe(id(0, 3), from: "c:*", now: 1))
        #expect(!hub.unsubscribe(id(0, 2), from: "a:*", now: 1))
        #expect(hub.patternSubscriptions == 2)

        #expect(hub.unsubscribe(id(0, 1), from: "a:*", now: 1))
        #expect(hub.patternSubscriptions == 1)
        #expect(!hub.subscribe(id(0, 3), to: "c:*", resume: nil, now: 2).refused)
        #expect(hub.patternSubscriptions == 2)
    }

    @Test("a connection that goes away gives back every pattern it held")
    func releaseOnClose() {
        let hub = makeHub(limit: 4)
        let gone = id(1, 7)
        for name in ["a:*", "b:*", "c:*", "exact"] { _ = hub.subscribe(gone, to: name, resume: nil, now: 0) }
        _ = hub.subscribe(id(0, 8), to: "a:*", resume: nil, now: 0)
        #expect(hub.patternSubscriptions == 4)
        #expect(hub.subscribe(id(0, 9), to: "d:*", resume: nil, now: 0).refused)

        hub.unsubscribe(gone, fromAll: ["a:*", "b:*", "c:*", "exact", "never:*"], now: 1)
        #expect(hub.patternSubscriptions == 1)
        for (serial, name) in [(9, "d:*"), (10, "e:*"), (11, "f:*")] as [(UInt64, String)] {
            #expect(!hub.subscribe(id(0, serial), to: name, resume: nil, now: 2).refused)
        }
        #expect(hub.subscribe(id(0, 12), to: "g:*", resume: nil, now: 2).refused)
    }

    @Test("a bound of 0 refuses every pattern and no exact topic")
    func zero() {
        let hub = makeHub(limit: 0)
        #expect(hub.subscribe(id(0, 1), to: "*", resume: nil, now: 0).refused)
        #expect(!hub.subscribe(id(0, 1), to: "t", resume: nil, now: 0).refused)
        #expect(hub.patternSubscriptions == 0)
    }
}
