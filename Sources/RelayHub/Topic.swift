// Topic: one topic's numbering, history and subscribers, as the hub keeps them.

import NIOCore

/// Names one subscriber connection: the event loop that owns it and a serial number.
///
/// The hub only groups by `loop`; it never touches the connection.
public struct SubscriberID: Hashable, Sendable, CustomStringConvertible {
    public let loop: Int
    public let serial: UInt64

    public init(loop: Int, serial: UInt64) {
        self.loop = loop
        self.serial = serial
    }

    public var description: String { "\(loop)/\(serial)" }
}

final class Topic {
    let name: String
    /// Changes only in cluster mode, when Redis resets the topic.
    var epoch: String
    var seq: UInt64 = 0
    var history: HistoryRing
    var newest: ByteBuffer?
    /// The hub's event count when the newest event arrived: orders a pattern's snapshot
    /// (a clock would tie within one batch).
    var lastEventOrder: UInt64 = 0
    /// When the topic last had an event or lost its last subscriber (orders forgetting).
    var lastActivity: UInt64

    /// Exact subscribers, grouped by event loop.
    var subscribers: [[SubscriberID]]
    var subscriberCount = 0
    /// Exact and pattern subscribers together, rebuilt when either changes.
    var targets: [[SubscriberID]]?
    var targetsVersion: UInt64 = 0
    /// Per loop, the SSE id formats `targets` need (SSEText.swift), rebuilt with them.
    var streamKinds: [UInt8] = []

    // Links of the hub's idle list (topics with no subscriber, least recently active first).
    var idlePrev: Topic?
    var idleNext: Topic?
    var isIdleListed = false

    // Links of the hub's history list (topics holding events older than their newest, by last
    // event): the order in which `--max-history-bytes` drops history.
    var historyPrev: Topic?
    var historyNext: Topic?
    var isHistoryListed = false
    /// This topic's frame bytes as last added to the hub's `historyBytes` (see `Hub.settle`).
    var accountedBytes = 0

    /// Whether the ring's newest frame is the topic's newest event: then `newest` is that same
    /// buffer, counted once.
    var ringHoldsNewest: Bool { history.count > 0 && history.lastSeq == seq }

    /// Bytes of every frame the topic holds, each buffer once, each with `frameOverhead`.
    func storedBytes(frameOverhead: Int) -> Int {
        let ring = history.bytes + history.count * frameOverhead
        guard !ringHoldsNewest, let newest else { return ring }
        return ring + newest.readableBytes + frameOverhead
    }

    /// History frames `--max-history-bytes` may drop: every one but the newest event.
    var droppableCount: Int { history.count - (ringHoldsNewest ? 1 : 0) }

    init(name: String, epoch: String, historyCapacity: Int, loops: Int, now: UInt64) {
        self.name = name
        self.epoch = epoch
        self.history = HistoryRing(capacity: historyCapacity)
        self.subscribers = Array(repeating: [], count: loops)
        self.lastActivity = now
    }

    func append(_ frame: ByteBuffer, order: UInt64, now: UInt64) {
        seq += 1
        history.append(frame, seq: seq)
        newest = frame
        lastEventOrder = order
        lastActivity = now
    }

    /// Takes another numbering wholesale: a topic Redis reset, or the history read when joining it.
    func replace(epoch: String, seq: UInt64, history: HistoryRing, newest: ByteBuffer?) {
        self.epoch = epoch
        self.seq = seq
        self.history = history
        self.newest = newest
    }

    /// Adds `id`; false when it was already there.
    func add(_ id: SubscriberID) -> Bool {
        if subscribers[id.loop].contains(id) { return false }
        subscribers[id.loop].append(id)
        subscriberCount += 1
        targets = nil
        return true
    }

    /// Removes `id`; false when it was not there.
    func remove(_ id: SubscriberID) -> Bool {
        guard let index = subscribers[id.loop].firstIndex(of: id) else { return false }
        subscribers[id.loop].remove(at: index)
        subscriberCount -= 1
        targets = nil
        return true
    }
}

/// Topics with no subscriber, least recently active first: the order in which
/// `--max-topics` and `--topic-ttl` forget them. Intrusive, so moving a topic is O(1).
struct IdleList {
    private(set) var head: Topic?
    private var tail: Topic?

    mutating func append(_ topic: Topic) {
        if topic.isIdleListed { remove(topic) }
        topic.isIdleListed = true
        topic.idlePrev = tail
        topic.idleNext = nil
        if let tail { tail.idleNext = topic } else { head = topic }
        tail = topic
    }

    mutating func remove(_ topic: Topic) {
        guard topic.isIdleListed else { return }
        if let prev = topic.idlePrev { prev.idleNext = topic.idleNext } else { head = topic.idleNext }
        if let next = topic.idleNext { next.idlePrev = topic.idlePrev } else { tail = topic.idlePrev }
        topic.idlePrev = nil
        topic.idleNext = nil
        topic.isIdleListed = false
    }
}
