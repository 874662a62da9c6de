// WebSocketText: server-to-client text frames, built once and shared.
//
// The hub keeps every event as a finished WebSocket frame (header and payload
// in one buffer), so fan-out writes the very same bytes to every subscriber
// and history replay costs no encoding. Server frames are never masked
// (RFC 6455 section 5.1), so a frame is just a header and the payload.

import NIOCore

public enum WebSocketText {
    /// Bytes the header of an unmasked frame with `payloadLength` bytes takes.
    @inlinable
    public static func headerLength(payloadLength: Int) -> Int {
        payloadLength < 126 ? 2 : (payloadLength <= 0xFFFF ? 4 : 10)
    }

    /// Writes the header of a final, unmasked frame of `opcode` (0x1 text, 0x8 close, 0x9 ping).
    @inlinable
    public static func writeHeader(opcode: UInt8 = 0x1, payloadLength: Int, into buffer: inout ByteBuffer) {
        buffer.writeInteger(0x80 | opcode)
        if payloadLength < 126 {
            buffer.writeInteger(UInt8(payloadLength))
        } else if payloadLength <= 0xFFFF {
            buffer.writeInteger(UInt8(126))
            buffer.writeInteger(UInt16(payloadLength))
        } else {
            buffer.writeInteger(UInt8(127))
            buffer.writeInteger(UInt64(payloadLength))
        }
    }

    /// A whole text frame carrying `text`.
    public static func frame(_ text: String, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> ByteBuffer {
        let count = text.utf8.count
        var buffer = allocator.buffer(capacity: headerLength(payloadLength: count) + count)
        writeHeader(payloadLength: count, into: &buffer)
        buffer.writeString(text)
        return buffer
    }

    /// `{"op":"subscribed",...}` as a whole text frame: the answer to a subscription.
    ///
    /// Here rather than only in the server's control frames because in cluster mode the hub itself
    /// sends a repeated `subscribed` when Redis resets a topic, built once for all its subscribers.
    /// The bytes match the server's `ControlFrame.subscribed` for the same values.
    /// `pingInterval`, a JSON number of seconds, is added as `"ping_interval"` (the server does it
    /// on the first `subscribed` of a connection, so that clients time their heartbeat from it).
    public static func subscribedFrame(
        topic: String, epoch: String?, seq: UInt64, recovered: Bool, pingInterval: String? = nil,
        allocator: ByteBufferAllocator = ByteBufferAllocator()
    ) -> ByteBuffer {
        var json = "{\"op\":\"subscribed\",\"topic\":" + jsonString(topic)
        if let epoch { json += ",\"epoch\":" + jsonString(epoch) }
        json += ",\"seq\":\(seq),\"recovered\":\(recovered)"
        if let pingInterval { json += ",\"ping_interval\":" + pingInterval }
        json += "}"
        return frame(json, allocator: allocator)
    }

    /// `text` as a JSON string literal (the same escaping as the server's control frames).
    public static func jsonString(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    /// The payload of a frame made by this type (the frame without its header).
    public static func payload(of frame: ByteBuffer) -> ByteBuffer {
        guard let second = frame.getInteger(at: frame.readerIndex + 1, as: UInt8.self) else { return frame }
        let length = second & 0x7F
        let header = length < 126 ? 2 : (length == 126 ? 4 : 10)
        return frame.getSlice(at: frame.readerIndex + header, length: frame.readableBytes - header) ?? frame
    }

    /// An event frame: `{"seq":N,` followed by the emitted object after its `{`.
    ///
    /// This is the only place an event's bytes are copied on their way out; the
    /// content is never decoded, so it is delivered exactly as it was written.
    public static func eventFrame(
        seq: UInt64,
        object: UnsafeRawBufferPointer,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        precondition(object.count >= 2 && object.first == UInt8(ascii: "{"))
        let digits = decimalDigits(seq)
        // `{"seq":` + digits + `,` + the object without its `{`
        let payloadLength = 7 + digits + 1 + object.count - 1
        var buffer = allocator.buffer(capacity: headerLength(payloadLength: payloadLength) + payloadLength)
        writeHeader(payloadLength: payloadLength, into: &buffer)
        buffer.writeStaticString("{\"seq\":")
        writeDecimal(seq, digits: digits, into: &buffer)
        buffer.writeInteger(UInt8(ascii: ","))
        buffer.writeBytes(UnsafeRawBufferPointer(rebasing: object.dropFirst()))
        return buffer
    }

    @inlinable
    static func decimalDigits(_ value: UInt64) -> Int {
        var count = 1
        var rest = value / 10
        while rest > 0 { count += 1; rest /= 10 }
        return count
    }

    @inlinable
    static func writeDecimal(_ value: UInt64, digits: Int, into buffer: inout ByteBuffer) {
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: digits) { out in
            var rest = value
            for index in stride(from: digits - 1, through: 0, by: -1) {
                out[index] = UInt8(ascii: "0") + UInt8(rest % 10)
                rest /= 10
            }
            return digits
        }
    }
}
