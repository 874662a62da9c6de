// HistoryBytes: `--max-history-bytes`, one bound on the event bytes every topic holds together.
//
// `--history` bounds one topic and `--max-topics` the number of topics, but their product
// (100 events of 64 KiB in each of 100,000 topics) is far more memory than any host has. The hub
// counts every frame it holds, each buffer once (a topic's newest event is also the newest frame
// of its ring) with a fixed overhead per frame, plus a fixed overhead per topic, and when a batch leaves the total over the cap it
// evicts down to 90 % of it, so that eviction runs once per many events rather than on each:
//
// 1. history first: the oldest frames of the topics whose last event is oldest, never a topic's
//    newest event. A resume into what was dropped is answered as one older than the ring
//    (`recovered:false` and the newest event).
// 2. then, if newest events alone are over, whole topics in `--max-topics` order (no subscriber,
//    idle longest first). A topic with subscribers is never forgotten: its live subscribers would
//    see its numbering start again under a new epoch for no reason they could act on.
//
// Both orders are intrusive lists moved in O(1) per event, and each eviction step removes a frame
// or a topic that an event or a subscribe added, so the cost per event stays O(1) amortised.
// Nothing here refuses or delays an event: the bound is kept after the batch is applied.

import NIOCore

/// Evictions `--max-history-bytes` made since the hub started.
public struct HistoryEvictions: Sendable, Equatable {
    /// History frames dropped (never a topic's newest event).
    public var events: Int
    /// Topics forgotten because newest events alone were over the cap.
    public var topics: Int

    public init(events: Int = 0, topics: Int = 0) {
        self.events = events
        self.topics = topics
    }
}

/// Topics that hold history beyond their newest event, least recent last event first.
/// Intrusive, as `IdleList`, so moving a topic is O(1).
struct HistoryList {
    private(set) var head: Topic?
    private var tail: Topic?

    mutating func append(_ topic: Topic) {
        if topic.isHistoryListed { remove(topic) }
        topic.isHistoryListed = true
        topic.historyPrev = tail
        topic.historyNext = nil
        if let tail { tail.historyNext = topic } else { head = topic }
        tail = topic
    }

    mutating func remove(_ topic: Topic) {
        guard topic.isHistoryListed else { return }
        if let prev = topic.historyPrev { prev.historyNext = topic.historyNext } else { head = topic.historyNext }
        if let next = topic.historyNext { next.historyPrev = topic.historyPrev } else { tail = topic.historyPrev }
        topic.historyPrev = nil
        topic.historyNext = nil
        topic.isHistoryListed = false
    }
}

extension Hub {
    /// Adds a new topic to the hub and to the byte count.
    func insert(_ topic: Topic) {
        topics[topic.name] = topic
        historyBytes += configuration.topicOverheadBytes
        settle(topic, eventArrived: true)
    }

    /// Brings the byte count and the history list up to date after `topic`'s frames changed.
    /// - Parameter eventArrived: the topic has a new newest event, so it moves to the list's end.
    func settle(_ topic: Topic, eventArrived: Bool) {
        // Every path that gives a topic a new event passes here (publish, Redis's numbering, resets).
        if eventArrived, !awaitedTopics.isEmpty, awaitedTopics.contains(topic.name) { awaitedEvent?(topic.name) }
        let bytes = topic.storedBytes(frameOverhead: configuration.frameOverheadBytes)
        historyBytes += bytes - topic.accountedBytes
        topic.accountedBytes = bytes
        if topic.droppableCount > 0 {
            if eventArrived || !topic.isHistoryListed { historyList.append(topic) }
        } else {
            historyList.remove(topic)
        }
    }

    /// Takes a forgotten topic's bytes off the count.
    func unaccount(_ topic: Topic) {
        historyList.remove(topic)
        historyBytes -= topic.accountedBytes + configuration.topicOverheadBytes
        topic.accountedBytes = 0
    }

    /// When over `--max-history-bytes`, evicts down to 90 % of it (see the top of this file).
    func enforceHistoryBytes() {
        let cap = configuration.maxHistoryBytes
        guard historyBytes > cap else { return }
        let target = cap - cap / 10
        while historyBytes > target, let topic = historyList.head {
            let droppable = topic.droppableCount
            var dropped = 0
            var freed = 0
            while dropped < droppable, historyBytes - freed > target {
                freed += topic.history.frame(at: dropped).readableBytes + configuration.frameOverheadBytes
                dropped += 1
            }
            topic.history.dropOldest(dropped)
            evictionWork += 1 + dropped + topic.history.count
            historyEvictions.events += dropped
            settle(topic, eventArrived: false)
        }
        while historyBytes > target, let topic = idle.head {
            forget(topic)
            evictionWork += 1
            historyEvictions.topics += 1
        }
    }
}
