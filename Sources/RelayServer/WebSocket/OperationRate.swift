// OperationRate: how many operations one subscriber connection may ask for.
//
// Every operation costs the relay work on its loop or the hub's (a JSON parse, a subscription
// change, an answer to write), so one connection must not be able to keep a loop busy. A token
// bucket on the monotonic clock: a steady rate, and a burst for a client that reconnects and
// subscribes to its topics at once.

import NIOCore

struct OperationRate {
    /// Operations per second a connection may keep up: text messages and control frames
    /// together. A browser tab asks for a handful per minute (subscriptions, refreshes, pongs);
    /// 100/s is two orders of magnitude above that and still cheap for the relay.
    static let perSecond = 100
    /// Operations allowed at once: a client (re)subscribing to `--max-subscriptions` (100)
    /// topics in one go, twice over, must never hit the limit.
    static let burst = 200

    private var tokens: Double
    private var updated: NIODeadline
    private let perSecond: Double
    private let burst: Double

    init(now: NIODeadline = .now(), perSecond: Int = Self.perSecond, burst: Int = Self.burst) {
        self.perSecond = Double(perSecond)
        self.burst = Double(burst)
        self.tokens = Double(burst)
        self.updated = now
    }

    /// Takes one operation's token; false when the connection is over its rate.
    mutating func take(now: NIODeadline = .now()) -> Bool {
        let elapsed = Double(max(0, (now - updated).nanoseconds)) / 1e9
        updated = now
        tokens = min(burst, tokens + elapsed * perSecond)
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}
