// RejectionLogLimiter: how many rejected-line log entries one connection may cause.
//
// 1 GiB of random bytes is about four million bad lines; logged one by one
// they would flood the journal and cost more than reading them. So each
// connection logs the first few a minute and then, once that minute is over,
// one summary with the count of those it did not log.

import NIOCore

struct RejectionLogLimiter {
    let perWindow: Int
    let window: TimeAmount
    private var windowStart: NIODeadline?
    private var logged = 0
    /// Rejections in the current window that were not logged.
    private(set) var suppressed = 0

    init(perWindow: Int = 10, window: TimeAmount = .seconds(60)) {
        self.perWindow = perWindow
        self.window = window
    }

    /// Whether to log this rejection, and the count of the previous window's unlogged ones when
    /// that window just ended (to be logged first, as its summary).
    mutating func admit(now: NIODeadline = .now()) -> (log: Bool, summary: Int?) {
        let summary = rollOver(now: now)
        if windowStart == nil { windowStart = now }
        if logged < perWindow {
            logged += 1
            return (true, summary)
        }
        suppressed += 1
        return (false, summary)
    }

    /// The unlogged count of a window that has ended (nil when none), for a periodic check.
    mutating func rollOver(now: NIODeadline = .now()) -> Int? {
        guard let start = windowStart, now - start >= window else { return nil }
        let summary = suppressed > 0 ? suppressed : nil
        windowStart = nil
        logged = 0
        suppressed = 0
        return summary
    }

    /// At the connection's end: what was never summarised.
    mutating func finish() -> Int? {
        defer { suppressed = 0 }
        return suppressed > 0 ? suppressed : nil
    }
}
