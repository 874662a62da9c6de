// HubReads: reading a topic without subscribing to it, for the HTTP routes `GET /topics/{topic}`
// and `GET /topics/{topic}/events` (long-poll). A read never creates a topic, so a GET cannot
// fill `--max-topics` with names nobody publishes to.

import NIOCore

/// What a read of one topic found.
public enum TopicReadResult: Sendable {
    /// The hub holds no such topic (never had an event, or forgotten).
    case notHeld
    /// Nothing to answer yet: no event after the reader's `since` in its epoch, or (without
    /// `since`) no event at all. A long-poll waits; a plain read answers an empty list.
    case upToDate(TopicPosition)
    /// Events to answer with, oldest first, by the subscribe rules: `recovered` when exactly the
    /// events after `since` follow; otherwise the newest event alone (none when it has none).
    case events(TopicPosition, recovered: Bool, frames: [ByteBuffer])
}

extension Hub {
    /// The topic's position and newest event frame; nil when the hub does not hold it.
    public func latest(_ name: String) -> (position: TopicPosition, frame: ByteBuffer?)? {
        guard let topic = topics[name] else { return nil }
        return (TopicPosition(epoch: topic.epoch, seq: topic.seq), topic.newest)
    }

    /// The events after `resume` as a subscribe with that resume point would be sent them.
    ///
    /// One difference from subscribe: a `since` at or ahead of the topic's newest seq in its own
    /// epoch is `upToDate` (a long-poll waits), where subscribe would send `recovered:false`.
    /// Ahead happens in cluster mode when the reader saw a faster relay, and waiting is what
    /// catches up with it.
    public func read(_ name: String, resume: ResumePoint?) -> TopicReadResult {
        guard let topic = topics[name] else { return .notHeld }
        return Self.answer(
            position: TopicPosition(epoch: topic.epoch, seq: topic.seq), resume: resume, newest: topic.newest,
            after: { topic.history.frames(after: $0) })
    }

    /// The rules of `read`, for any store of a topic's frames (the hub's ring, or a read from Redis).
    /// - Parameter after: the frames after a seq, or nil when the store no longer holds them all.
    public static func answer(
        position: TopicPosition, resume: ResumePoint?, newest: ByteBuffer?, after: (UInt64) -> [ByteBuffer]?
    ) -> TopicReadResult {
        guard let resume else {
            guard let newest else { return .upToDate(position) }
            return .events(position, recovered: false, frames: [newest])
        }
        if resume.epoch == position.epoch {
            if resume.since >= position.seq { return .upToDate(position) }
            if let missed = after(resume.since) { return .events(position, recovered: true, frames: missed) }
        }
        return .events(position, recovered: false, frames: newest.map { [$0] } ?? [])
    }

    /// An event frame as the hub builds it, for events read from elsewhere (Redis).
    public static func eventFrame(seq: UInt64, object: ByteBuffer, allocator: ByteBufferAllocator) -> ByteBuffer? {
        guard object.readableBytes >= 2, object.getInteger(at: object.readerIndex, as: UInt8.self) == UInt8(ascii: "{")
        else { return nil }
        return object.withUnsafeReadableBytes { WebSocketText.eventFrame(seq: seq, object: $0, allocator: allocator) }
    }
}
