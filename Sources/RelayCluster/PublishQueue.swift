// PublishQueue: the lines a relay has read and Redis has not yet acknowledged.
//
// Cluster mode numbers the lines it publishes 1, 2, 3, ... (the per-process
// counter of the sequencing script) and must be able to send any of them again
// until Redis has answered for it: after a lost connection, a refused line, or a
// `gap`. So a line stays here from the moment ingest hands it over until its
// script call is answered `published` or `duplicate` (or the line is skipped),
// and the queue's bytes are what `--redis-queue-bytes` bounds.
//
// Lines only ever leave from the front. A line answered out of turn is marked
// done in place and leaves when it reaches the front, so the counters of the
// lines held are always consecutive, and a line is found by its counter with
// one subtraction. The queue does no I/O; ClusterPublisher drives it.

import NIOCore

/// One line waiting for Redis.
struct PendingLine {
    /// The relay's number for the line (ARGV[9] of the script).
    let counter: UInt64
    /// The topic the line belongs to.
    let topic: String
    /// The event line as received.
    let line: ByteBuffer
    /// What the line counts against the bound: its bytes and its topic's.
    let bytes: Int
    /// Whether the line was sent at least once (a later send is a resend).
    var sent = false
    /// Acknowledged or skipped, but not yet at the front.
    var done = false
}

/// The unacknowledged lines of one relay process, oldest first, with their byte count.
struct PublishQueue {
    /// The bound on ``bytes``: at or above it, ingest must stop reading.
    let limit: Int
    /// Below this, ingest may read again (half the limit, so that reading does not flap per line).
    let resumeBelow: Int

    private var lines = CircularBuffer<PendingLine>(initialCapacity: 1024)
    /// The bytes of the lines not yet done.
    private(set) var bytes = 0
    /// The counter the next appended line gets.
    private(set) var nextCounter: UInt64 = 1
    /// The counter of the next line to send in the current round.
    private var sendCursor: UInt64 = 1

    init(limit: Int) {
        precondition(limit > 0, "the queue bound must be positive")
        self.limit = limit
        self.resumeBelow = limit / 2
    }

    /// Lines held: every line not yet done, and any done out of turn behind one that is not.
    var count: Int { self.lines.count }
    var isEmpty: Bool { self.lines.isEmpty }
    /// Whether ingest must stop reading.
    var isFull: Bool { self.bytes >= self.limit }
    /// Whether ingest, stopped, may read again.
    var hasRoom: Bool { self.bytes < self.resumeBelow || self.lines.isEmpty }

    /// The oldest line not acknowledged (the script's `first`), if any.
    var oldestUnacknowledged: UInt64? { self.lines.first?.counter }

    /// Appends a line and returns its counter.
    mutating func append(topic: String, line: ByteBuffer) -> UInt64 {
        let counter = self.nextCounter
        self.nextCounter += 1
        let size = line.readableBytes + topic.utf8.count
        self.lines.append(PendingLine(counter: counter, topic: topic, line: line, bytes: size))
        self.bytes += size
        return counter
    }

    /// Marks the line `counter` done (acknowledged or skipped), and lets done lines at the front go.
    ///
    /// - Returns: whether the line was held and not yet done.
    @discardableResult
    mutating func markDone(_ counter: UInt64) -> Bool {
        guard let first = self.lines.first?.counter, counter >= first, counter - first < UInt64(self.lines.count) else {
            return false
        }
        let index = self.lines.index(self.lines.startIndex, offsetBy: Int(counter - first))
        guard !self.lines[index].done else { return false }
        self.lines[index].done = true
        self.bytes -= self.lines[index].bytes
        while let head = self.lines.first, head.done {
            self.lines.removeFirst()
        }
        return true
    }

    /// The line `counter`, if held.
    func line(_ counter: UInt64) -> PendingLine? {
        guard let first = self.lines.first?.counter, counter >= first, counter - first < UInt64(self.lines.count) else {
            return nil
        }
        return self.lines[self.lines.index(self.lines.startIndex, offsetBy: Int(counter - first))]
    }

    /// Whether the current round has lines it has not sent yet.
    var hasUnsent: Bool {
        guard let first = self.lines.first?.counter else { return false }
        return max(self.sendCursor, first) < self.nextCounter
    }

    /// Starts a round: the next line to send is the oldest unacknowledged one.
    mutating func rewind() {
        self.sendCursor = self.lines.first?.counter ?? self.nextCounter
    }

    /// The next line to send in this round, marked sent, with whether it was sent before; or nil
    /// when every line held was sent in this round.
    mutating func nextToSend() -> (line: PendingLine, resend: Bool)? {
        if let first = self.lines.first?.counter, self.sendCursor < first {
            self.sendCursor = first
        }
        while let first = self.lines.first?.counter, self.sendCursor - first < UInt64(self.lines.count) {
            let index = self.lines.index(self.lines.startIndex, offsetBy: Int(self.sendCursor - first))
            self.sendCursor += 1
            if self.lines[index].done { continue }
            let resend = self.lines[index].sent
            self.lines[index].sent = true
            return (self.lines[index], resend)
        }
        return nil
    }

    /// Drops every line (the publisher closed); returns how many were not done.
    mutating func removeAll() -> Int {
        let left = self.lines.count
        self.lines.removeAll()
        self.bytes = 0
        return left
    }
}
