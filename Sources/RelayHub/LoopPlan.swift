// LoopPlan: the frames one published batch sends through one event loop.
//
// Built on the hub's thread and read on the loop's, once per batch. It holds
// every frame once, in publishing order, and runs of consecutive frames of one
// topic with the subscribers they go to. Flat arrays rather than an array per
// event: at hundreds of thousands of events a second, a small array per event
// (allocated on one core, retained and freed on another) was a visible share
// of the profile.

import NIOCore

public struct LoopPlan: Sendable {
    /// Every frame for this loop, in publishing order.
    public private(set) var frames: [ByteBuffer] = []
    /// Consecutive frames of one topic and who receives them; a run starts where the previous ended.
    public private(set) var runs: [Run] = []

    public struct Run: Sendable {
        /// One past the run's last index in `frames`.
        public var end: Int
        public var targets: Targets
    }

    /// A topic's subscribers on this loop; most progress topics have one, which needs no array.
    public enum Targets: Sendable, Equatable {
        case one(SubscriberID)
        case many([SubscriberID])
    }

    /// The SSE forms of `frames`, same indices (SSEText.swift); empty while no run of this plan
    /// goes to an event stream, so WebSocket-only fan-out carries nothing more.
    public private(set) var streamFrames: [EventStreamFrames?] = []

    public init() {}

    public var isEmpty: Bool { runs.isEmpty }

    /// Adds `frame` for `subscribers`, to the last run when the frame continues its topic.
    mutating func append(
        _ frame: ByteBuffer, stream: EventStreamFrames? = nil, to subscribers: [SubscriberID], continuingRun: Bool
    ) {
        if stream != nil || !streamFrames.isEmpty {
            if streamFrames.count < frames.count {
                streamFrames.append(contentsOf: repeatElement(nil, count: frames.count - streamFrames.count))
            }
            streamFrames.append(stream)
        }
        frames.append(frame)
        if continuingRun, !runs.isEmpty {
            runs[runs.count - 1].end = frames.count
        } else {
            runs.append(Run(end: frames.count, targets: subscribers.count == 1 ? .one(subscribers[0]) : .many(subscribers)))
        }
    }

    /// Appends every frame and run of `other`, after this plan's: how the cluster layer sends the
    /// events of many Redis messages in one hop per loop.
    public mutating func append(contentsOf other: LoopPlan) {
        let offset = frames.count
        if !other.streamFrames.isEmpty || !streamFrames.isEmpty {
            streamFrames.append(contentsOf: repeatElement(nil, count: offset - streamFrames.count))
            streamFrames.append(contentsOf: other.streamFrames)
            streamFrames.append(
                contentsOf: repeatElement(nil, count: other.frames.count - other.streamFrames.count))
        }
        frames.append(contentsOf: other.frames)
        runs.reserveCapacity(runs.count + other.runs.count)
        for run in other.runs {
            runs.append(Run(end: run.end + offset, targets: run.targets))
        }
    }

    /// Calls `body` once per run: the subscribers, and the range of `frames` they receive.
    @inlinable
    public func forEachRun(_ body: (Targets, Range<Int>) throws -> Void) rethrows {
        var start = 0
        for run in runs {
            try body(run.targets, start..<run.end)
            start = run.end
        }
    }
}
