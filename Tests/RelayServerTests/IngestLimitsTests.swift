// IngestLimitsTests: the ingest side's small bookkeepers on their own: the shared in-flight
// budget, the per-connection log limiter for rejected lines, the emitter counts per uid.

import NIOCore
import NIOEmbedded
import Synchronization
import Testing

@testable import RelayServer

@Suite struct IngestBudgetTests {
    @Test func spentAtTheLimitAndResumedBelowIt() {
        let budget = IngestBudget(limit: 100)
        var resumed = 0
        budget.take(99)
        #expect(!budget.isSpent)
        budget.take(1)
        #expect(budget.isSpent)
        budget.wait { resumed += 1 }
        budget.wait { resumed += 1 }
        budget.give(0)
        #expect(resumed == 0)
        budget.give(1)
        #expect(resumed == 2, "every waiting connection resumes")
        budget.give(99)
        #expect(resumed == 2, "each wait resumes once")
        #expect(budget.inFlight == 0)
    }

    @Test func aBlockHoldsEvenAnEmptyBudgetUntilItsFutureCompletes() {
        let loop = EmbeddedEventLoop()
        let budget = IngestBudget(limit: 100)
        let first = loop.makePromise(of: Void.self)
        let second = loop.makePromise(of: Void.self)
        budget.block(until: first.futureResult)
        budget.block(until: second.futureResult)
        var resumed = 0
        budget.wait { resumed += 1 }
        #expect(budget.isSpent)
        first.succeed()
        #expect(budget.isSpent && resumed == 0, "one block still holds")
        second.fail(ChannelError.ioOnClosedChannel)
        #expect(!budget.isSpent && resumed == 1, "a failed future ends its block too")
        try? loop.syncShutdownGracefully()
    }

    @Test func aBlockEndingWhileBytesAreInFlightOverTheLimitResumesNothing() {
        let loop = EmbeddedEventLoop()
        let budget = IngestBudget(limit: 10)
        let pause = loop.makePromise(of: Void.self)
        budget.take(10)
        budget.block(until: pause.futureResult)
        var resumed = 0
        budget.wait { resumed += 1 }
        pause.succeed()
        #expect(resumed == 0)
        budget.give(10)
        #expect(resumed == 1)
        try? loop.syncShutdownGracefully()
    }
}

@Suite struct RejectionLogLimiterTests {
    private let start = NIODeadline.uptimeNanoseconds(1_000_000_000)

    @Test func theFirstTenAMinuteAreLoggedThenOneSummary() {
        var limiter = RejectionLogLimiter()
        let admitted = (0..<25).map { limiter.admit(now: start + .seconds(Int64($0))) }
        #expect(admitted.filter(\.log).count == 10)
        #expect(admitted.prefix(10).allSatisfy { $0.log })
        #expect(admitted.allSatisfy { $0.summary == nil })
        #expect(limiter.suppressed == 15)
        // The next rejection after the minute: the summary of the 15, and logged itself.
        let next = limiter.admit(now: start + .seconds(60))
        #expect(next.summary == 15 && next.log)
        #expect(limiter.suppressed == 0)
    }

    @Test func thePeriodicCheckSummarisesAnEndedWindowOnce() {
        var limiter = RejectionLogLimiter(perWindow: 2, window: .seconds(60))
        for second in 0..<5 { _ = limiter.admit(now: start + .seconds(Int64(second))) }
        #expect(limiter.rollOver(now: start + .seconds(59)) == nil, "the window has not ended")
        #expect(limiter.rollOver(now: start + .seconds(60)) == 3)
        #expect(limiter.rollOver(now: start + .seconds(200)) == nil, "no second summary")
    }

    @Test func aWindowWithNothingSuppressedHasNoSummary() {
        var limiter = RejectionLogLimiter(perWindow: 2, window: .seconds(60))
        _ = limiter.admit(now: start)
        #expect(limiter.rollOver(now: start + .seconds(61)) == nil)
        #expect(limiter.admit(now: start + .seconds(62)).log)
    }

    @Test func theConnectionsEndSummarisesWhatIsLeft() {
        var limiter = RejectionLogLimiter(perWindow: 1, window: .seconds(60))
        _ = limiter.admit(now: start)
        _ = limiter.admit(now: start)
        _ = limiter.admit(now: start)
        #expect(limiter.finish() == 2)
        #expect(limiter.finish() == nil)
    }
}

/// Counts the resumes `EmitterLimits` calls.
private final class Resumes: Sendable {
    private let names = Mutex<[String]>([])
    var all: [String] { names.withLock { $0 } }
    func callback(_ name: String) -> @Sendable () -> Void { { self.names.withLock { $0.append(name) } } }
}

@Suite struct EmitterLimitsTests {
    @Test func theTotalCountsOpenConnections() {
        let limits = EmitterLimits(settings: EmitterLimitSettings(maxEmitters: 2))
        #expect(limits.hasRoom)
        limits.opened()
        limits.opened()
        #expect(!limits.hasRoom && limits.openCount == 2)
        #expect(limits.closed(), "making room again wakes the accept thread")
        limits.opened()
        limits.opened()
        #expect(!limits.closed())
        #expect(limits.closed(), "only the close that makes room wakes it")
        #expect(!limits.closed())
    }

    @Test func aUidOverItsShareIsParkedAndResumedOldestFirst() {
        let limits = EmitterLimits(settings: EmitterLimitSettings(maxEmittersPerUID: 1))
        let resumes = Resumes()
        let a = limits.enter(uid: 5, resume: resumes.callback("a"))
        let b = limits.enter(uid: 5, resume: resumes.callback("b"))
        let c = limits.enter(uid: 5, resume: resumes.callback("c"))
        let other = limits.enter(uid: 6, resume: resumes.callback("other"))
        #expect(a.reading && !b.reading && !c.reading && other.reading)
        limits.leave(a, wasReading: true)
        #expect(resumes.all == ["b"])
        // A parked connection that ends gives up its place in line without resuming anyone.
        limits.leave(c, wasReading: false)
        limits.leave(b, wasReading: true)
        #expect(resumes.all == ["b"])
        #expect(limits.enter(uid: 5, resume: resumes.callback("d")).reading)
    }

    @Test func shutdownResumesEveryParkedConnectionAndParksNoMore() {
        let limits = EmitterLimits(settings: EmitterLimitSettings(maxEmittersPerUID: 1))
        let resumes = Resumes()
        _ = limits.enter(uid: 5, resume: resumes.callback("a"))
        _ = limits.enter(uid: 5, resume: resumes.callback("b"))
        _ = limits.enter(uid: 7, resume: resumes.callback("c"))
        _ = limits.enter(uid: 7, resume: resumes.callback("d"))
        limits.releaseAll()
        #expect(resumes.all.sorted() == ["b", "d"])
        #expect(limits.enter(uid: 5, resume: resumes.callback("e")).reading)
    }
}
