// SSEText: server-sent events (`GET /sse`), built once per event and shared like WebSocket frames.
//
// An SSE event is `id: <epoch>:<seq>` (a pattern stream: `id: <topic> <epoch>:<seq>`), then
// `data: ` and the very JSON the WebSocket frame carries, then a blank line. The hub builds it
// from the event's frame when, and only when, a target of that event is an event stream, once per
// event and id format, and puts it in the loop plan beside the frame; every SSE subscriber of the
// event is then written that same buffer, as WebSocket subscribers are written the frame.

import NIOCore

extension SubscriberID {
    /// Set in the serial of an event-stream (SSE) connection: the hub tells them apart with no
    /// lookup, and the cluster layer, which passes ids through, needs no change.
    public static let eventStreamBit: UInt64 = 1 << 63
    /// Also set when that stream follows a pattern: its ids carry the topic.
    public static let patternStreamBit: UInt64 = 1 << 62

    public var isEventStream: Bool { serial & Self.eventStreamBit != 0 }
    public var isPatternStream: Bool { serial & Self.patternStreamBit != 0 }

    /// The id format(s) an event needs for this subscriber (`SSEText.topicStream`, `.patternStream`), 0 for WebSocket.
    @inlinable
    public var streamKind: UInt8 {
        guard isEventStream else { return 0 }
        return isPatternStream ? SSEText.patternStream : SSEText.topicStream
    }
}

/// One event as SSE, in the id formats its stream subscribers need (nil where none needs it).
public struct EventStreamFrames: Sendable {
    /// `id: <epoch>:<seq>`, for a stream of one topic.
    public var topic: ByteBuffer?
    /// `id: <topic> <epoch>:<seq>`, for a pattern stream.
    public var pattern: ByteBuffer?

    public init(topic: ByteBuffer?, pattern: ByteBuffer?) {
        self.topic = topic
        self.pattern = pattern
    }

    /// The buffer for `id`'s format (empty when none was built, which a plan never asks for).
    @inlinable
    public func frame(for id: SubscriberID) -> ByteBuffer? {
        id.isPatternStream ? pattern : topic
    }
}

public enum SSEText {
    /// Bits of `SubscriberID.streamKind`.
    public static let topicStream: UInt8 = 1
    public static let patternStream: UInt8 = 2

    /// The id of an event: `E:S`, or `T E:S` on a pattern stream (a topic holds no space, so the
    /// first space splits it; an epoch may hold `:`, so the last `:` splits epoch and seq).
    public static func id(topic: String?, epoch: String, seq: UInt64) -> String {
        (topic.map { $0 + " " } ?? "") + epoch + ":" + String(seq)
    }

    /// `id:` (when given), an optional `event:` name, and `data:` with `json`, as one SSE event.
    /// A CR in `json` (JSON whitespace between tokens; inside a string it must be escaped) would
    /// end the `data:` line for an SSE parser, so it is written as a space: the same JSON value.
    public static func event(
        name: String? = nil, id: String?, json: ByteBuffer, allocator: ByteBufferAllocator = ByteBufferAllocator()
    ) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: json.readableBytes + (id?.utf8.count ?? 0) + 32)
        if let name {
            buffer.writeStaticString("event: ")
            buffer.writeString(name)
            buffer.writeInteger(UInt8(ascii: "\n"))
        }
        if let id {
            buffer.writeStaticString("id: ")
            buffer.writeString(id)
            buffer.writeInteger(UInt8(ascii: "\n"))
        }
        buffer.writeStaticString("data: ")
        let start = buffer.writerIndex
        buffer.writeImmutableBuffer(json)
        if json.readableBytesView.contains(UInt8(ascii: "\r")) {
            for index in start..<buffer.writerIndex where buffer.getInteger(at: index, as: UInt8.self) == UInt8(ascii: "\r") {
                buffer.setInteger(UInt8(ascii: " "), at: index)
            }
        }
        buffer.writeStaticString("\n\n")
        return buffer
    }

    /// An event's SSE forms, from its WebSocket frame, for the formats in `kinds`.
    public static func eventFrames(
        topic: String, epoch: String, seq: UInt64, frame: ByteBuffer, kinds: UInt8, allocator: ByteBufferAllocator
    ) -> EventStreamFrames {
        let json = WebSocketText.payload(of: frame)
        return EventStreamFrames(
            topic: kinds & topicStream != 0
                ? event(id: id(topic: nil, epoch: epoch, seq: seq), json: json, allocator: allocator) : nil,
            pattern: kinds & patternStream != 0
                ? event(id: id(topic: topic, epoch: epoch, seq: seq), json: json, allocator: allocator) : nil)
    }

    /// Which id formats `ids` need (`SubscriberID.streamKind` of each, together).
    @inlinable
    public static func kinds(of ids: [SubscriberID]) -> UInt8 {
        var kinds: UInt8 = 0
        for id in ids { kinds |= id.streamKind }
        return kinds
    }
}
