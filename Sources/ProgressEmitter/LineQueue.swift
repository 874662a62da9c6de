// LineQueue: the bounded queue between `emit` callers and the writer thread.

import Foundation

/// Counters shown by `ProgressEmitter`.
struct EmitterCounters: Sendable {
    var dropped = 0
    var failed = 0
    var rejected = 0
    var written = 0
}

// Sendable by hand: every stored property is read and written only with `condition` locked.
final class LineQueue: @unchecked Sendable {
    private let condition = NSCondition()
    private var lines: [[UInt8]] = []
    private var head = 0
    private let capacity: Int
    /// Lines the writer took and has not confirmed yet (written, or handed back).
    private var inFlight = 0
    private var closed = false
    private var stats = EmitterCounters()

    init(capacity: Int) {
        self.capacity = capacity
    }

    private var count: Int { lines.count - head }

    func append(_ line: [UInt8]) {
        condition.lock()
        defer { condition.unlock() }
        guard !closed else {
            stats.dropped += 1
            return
        }
        if count + inFlight >= capacity, count > 0 {
            dropOldest(1)
        }
        lines.append(line)
        condition.signal()
    }

    /// Drops the `n` oldest queued lines, and compacts the storage once most of it is dropped
    /// lines: while the relay is away nothing is taken, and the array must not grow forever.
    private func dropOldest(_ n: Int) {
        for index in head..<(head + n) { lines[index] = [] }
        head += n
        stats.dropped += n
        compact()
    }

    private func compact() {
        if head > 1024, head * 2 > lines.count {
            lines.removeFirst(head)
            head = 0
        }
    }

    func countFailure() {
        condition.lock()
        stats.failed += 1
        condition.unlock()
    }

    var counters: EmitterCounters {
        condition.lock()
        defer { condition.unlock() }
        return stats
    }

    /// Waits until there is a line to send; false once closed and empty.
    func waitForLines() -> Bool {
        condition.lock()
        defer { condition.unlock() }
        while count == 0, !closed { condition.wait() }
        return count > 0
    }

    /// Lines the writer could not write go back to the front, oldest first, and are dropped
    /// like any other when the queue overflows: the writer holds lines only while writing them.
    func giveBack(_ unwritten: [[UInt8]]) {
        guard !unwritten.isEmpty else { return }
        condition.lock()
        defer { condition.unlock() }
        inFlight -= unwritten.count
        lines.replaceSubrange(head..<head, with: unwritten)
        let excess = count - capacity
        if excess > 0 { dropOldest(excess) }
        condition.broadcast()
    }

    /// Waits for lines and takes up to `limit` of them; nil once closed and empty.
    func take(limit: Int) -> [[UInt8]]? {
        condition.lock()
        defer { condition.unlock() }
        while count == 0, !closed { condition.wait() }
        guard count > 0 else { return nil }
        let end = min(lines.count, head + limit)
        let batch = Array(lines[head..<end])
        head = end
        inFlight += batch.count
        compact()
        return batch
    }

    /// The writer wrote `count` lines of its batch.
    func confirm(_ count: Int) {
        condition.lock()
        inFlight -= count
        stats.written += count
        condition.broadcast()
        condition.unlock()
    }

    func countRejected(_ count: Int) {
        guard count > 0 else { return }
        condition.lock()
        stats.rejected += count
        condition.unlock()
    }

    var isClosed: Bool {
        condition.lock()
        defer { condition.unlock() }
        return closed
    }

    /// Sleeps up to `duration`, waking early when the queue is closed.
    func pause(_ duration: Duration) {
        condition.lock()
        defer { condition.unlock() }
        let deadline = Date(timeIntervalSinceNow: duration.seconds)
        while !closed, Date() < deadline {
            _ = condition.wait(until: deadline)
        }
    }

    func waitUntilDrained(timeout: Duration) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        let deadline = Date(timeIntervalSinceNow: timeout.seconds)
        while count + inFlight > 0 {
            if closed || !condition.wait(until: deadline) { return count + inFlight == 0 }
        }
        return true
    }

    func close() {
        condition.lock()
        closed = true
        condition.broadcast()
        condition.unlock()
    }
}

extension Duration {
    var seconds: Double {
        let (whole, fraction) = components
        return Double(whole) + Double(fraction) / 1e18
    }
}
