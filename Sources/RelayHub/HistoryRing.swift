// HistoryRing: the newest N event frames of one topic, for resume.
//
// A fixed-capacity ring, so a topic's memory never grows past `--history`
// frames however many events pass through it.

import NIOCore

struct HistoryRing {
    private var slots: [ByteBuffer]
    private var start = 0
    let capacity: Int
    /// Seq of the newest frame held (0 when empty).
    private(set) var lastSeq: UInt64 = 0
    /// Readable bytes of the frames held, for `--max-history-bytes`.
    private(set) var bytes = 0

    init(capacity: Int) {
        self.capacity = max(0, capacity)
        self.slots = []
        self.slots.reserveCapacity(min(self.capacity, 16))
    }

    var count: Int { slots.count }

    /// Seq of the oldest frame held (lastSeq + 1 when empty).
    var firstSeq: UInt64 { lastSeq + 1 - UInt64(slots.count) }

    mutating func append(_ frame: ByteBuffer, seq: UInt64) {
        lastSeq = seq
        guard capacity > 0 else { return }
        bytes += frame.readableBytes
        if slots.count < capacity {
            slots.append(frame)
        } else {
            bytes -= slots[start].readableBytes
            slots[start] = frame
            start = (start + 1) % capacity
        }
    }

    /// The frame at `index`, oldest first.
    func frame(at index: Int) -> ByteBuffer { slots[(start + index) % slots.count] }

    /// Drops the `count` oldest frames (`--max-history-bytes`); the numbering stays, so a resume
    /// into what was dropped is answered as one older than the ring.
    ///
    /// Copies what is left (at most `--history` frames) so that appending keeps its simple form;
    /// eviction calls it once per topic it trims in a batch, and keeps at most one topic partly.
    mutating func dropOldest(_ count: Int) {
        guard count > 0 else { return }
        let kept = all.dropFirst(count)
        bytes = kept.reduce(0) { $0 + $1.readableBytes }
        slots = Array(kept)
        start = 0
    }

    /// Continues the numbering at `seq` while holding nothing (a topic restored without history).
    mutating func resume(at seq: UInt64) {
        precondition(slots.isEmpty)
        lastSeq = seq
    }

    /// The frames after `since`, oldest first, or nil when the ring no longer holds all of them.
    func frames(after since: UInt64) -> [ByteBuffer]? {
        guard since <= lastSeq else { return nil }
        if since == lastSeq { return [] }
        guard since + 1 >= firstSeq else { return nil }
        let skip = Int(since + 1 - firstSeq)
        return (skip..<slots.count).map { slots[(start + $0) % slots.count] }
    }

    /// Every frame held, oldest first.
    var all: [ByteBuffer] {
        (0..<slots.count).map { slots[(start + $0) % slots.count] }
    }
}
