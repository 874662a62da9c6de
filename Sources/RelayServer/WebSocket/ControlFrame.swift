// ControlFrame: the relay's own messages to a subscriber (`op` frames, close, ping).
//
// These are rare next to events, so they are plain strings; event frames
// never pass through here.

import NIOCore
import RelayHub

enum ErrorCode: String {
    case unauthorized, forbidden
    case badRequest = "bad_request"
    case unknownOp = "unknown_op"
    case tooManySubscriptions = "too_many_subscriptions"
}

/// WebSocket close codes the relay sends (RFC 6455 section 7.4 and the contract's 44xx).
enum CloseCode: UInt16 {
    case normal = 1000
    case goingAway = 1001
    case protocolError = 1002
    case unsupportedData = 1003
    case invalidPayload = 1007
    /// Over the operation rate: back off, then fix the client.
    case policyViolation = 1008
    case messageTooBig = 1009
    case tryAgainLater = 1013
    case unauthorized = 4401
    case forbidden = 4403
}

enum ControlFrame {
    /// Built by the hub's own function: in cluster mode the hub sends the same frame on a reset.
    static func subscribed(topic: String, subscription: Subscription, pingInterval: String? = nil) -> ByteBuffer {
        WebSocketText.subscribedFrame(
            topic: topic, epoch: subscription.epoch, seq: subscription.seq, recovered: subscription.recovered,
            pingInterval: pingInterval)
    }

    /// `--ping-interval` as a JSON number of seconds: `25`, `0.5`.
    static func seconds(_ amount: TimeAmount) -> String {
        let nanoseconds = amount.nanoseconds
        if nanoseconds % 1_000_000_000 == 0 { return String(nanoseconds / 1_000_000_000) }
        return String(Double(nanoseconds) / 1e9)
    }

    static func unsubscribed(topic: String, reason: String? = nil) -> ByteBuffer {
        var json = "{\"op\":\"unsubscribed\",\"topic\":" + jsonString(topic)
        if let reason { json += ",\"reason\":" + jsonString(reason) }
        return WebSocketText.frame(json + "}")
    }

    static func error(_ code: ErrorCode, _ message: String, topic: String? = nil) -> ByteBuffer {
        var json = "{\"op\":\"error\",\"code\":\"\(code.rawValue)\",\"message\":" + jsonString(message)
        if let topic { json += ",\"topic\":" + jsonString(topic) }
        return WebSocketText.frame(json + "}")
    }

    static let pong = WebSocketText.frame("{\"op\":\"pong\",\"type\":\"pong\"}")

    static func refreshed(exp: Int64?) -> ByteBuffer {
        WebSocketText.frame("{\"op\":\"refreshed\",\"exp\":" + (exp.map(String.init) ?? "null") + "}")
    }

    static let ping: ByteBuffer = {
        var buffer = ByteBuffer()
        WebSocketText.writeHeader(opcode: 0x9, payloadLength: 0, into: &buffer)
        return buffer
    }()

    static func pong(payload: ByteBuffer) -> ByteBuffer {
        var buffer = ByteBuffer()
        WebSocketText.writeHeader(opcode: 0xA, payloadLength: payload.readableBytes, into: &buffer)
        buffer.writeImmutableBuffer(payload)
        return buffer
    }

    static func close(_ code: CloseCode, reason: String = "") -> ByteBuffer {
        // A control frame carries at most 125 bytes; cut between characters, so the reason stays UTF-8.
        var reasonBytes = Array(reason.utf8.prefix(123))
        while String(validating: reasonBytes, as: UTF8.self) == nil { reasonBytes.removeLast() }
        var buffer = ByteBuffer()
        WebSocketText.writeHeader(opcode: 0x8, payloadLength: 2 + reasonBytes.count, into: &buffer)
        buffer.writeInteger(code.rawValue)
        buffer.writeBytes(reasonBytes)
        return buffer
    }

    /// `text` as a JSON string literal.
    static func jsonString(_ text: String) -> String { WebSocketText.jsonString(text) }
}
