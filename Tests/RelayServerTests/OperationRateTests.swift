import NIOCore
import Testing

@testable import RelayServer

@Suite struct OperationRateTests {
    @Test func aBurstIsAllowedAndTheNextOperationIsNot() {
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
        var rate = OperationRate(now: start, perSecond: 100, burst: 200)
        var allowed = 0
        while rate.take(now: start) { allowed += 1 }
        #expect(allowed == 200)
    }

    @Test func tokensComeBackAtTheSteadyRateAndNeverAboveTheBurst() {
        let start = NIODeadline.uptimeNanoseconds(1_000_000_000)
        var rate = OperationRate(now: start, perSecond: 100, burst: 200)
        for _ in 0..<200 { _ = rate.take(now: start) }
        // 10 ms at 100/s is one operation, and only one
        let later = start + .milliseconds(10)
        let first = rate.take(now: later)
        let second = rate.take(now: later)
        #expect(first && !second)
        // an hour idle refills to the burst, not beyond it
        let muchLater = later + .hours(1)
        var allowed = 0
        while rate.take(now: muchLater) { allowed += 1 }
        #expect(allowed == 200)
    }

    @Test func aClockThatGoesBackwardsGivesNothingAway() {
        let start = NIODeadline.uptimeNanoseconds(5_000_000_000)
        var rate = OperationRate(now: start, perSecond: 100, burst: 1)
        let first = rate.take(now: start)
        let backwards = rate.take(now: start - .seconds(1))
        #expect(first && !backwards)
    }
}
