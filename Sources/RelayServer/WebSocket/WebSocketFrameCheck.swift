// WebSocketFrameCheck: the RFC 6455 rules a subscriber's frames must keep one by one, checked
// before NIO's frame aggregator (SubscriberPipeline.swift) puts fragments together.
//
// These checks must see every frame as sent: the aggregator drops the mask key and the RSV bits
// of the fragments it joins, and would buffer a fragmented binary message (refused here at its
// first frame with 1003, not later with the aggregator's 1002 for a short fragment). NIO's
// decoder has already refused control frames that are fragmented or over 125 bytes.
//
// A violation goes down the pipeline as a `WebSocketViolation` error, which the session answers
// with a close frame; nothing this handler reads after it, or after a client's close frame, is
// passed on (so the aggregator does no work for a connection that is ending).

import NIOCore
import NIOWebSocket

/// A client broke a rule of RFC 6455 or of the contract: the connection ends with this code.
struct WebSocketViolation: Error, Equatable {
    let code: CloseCode
    let reason: String

    init(_ code: CloseCode, _ reason: String = "") {
        self.code = code
        self.reason = reason
    }
}

/// Sent to the session for every whole frame read, fragments included: only whole frames count
/// as hearing from a client (a frame trickled a byte at a time does not keep a connection).
struct WebSocketFrameHeard {}

final class WebSocketFrameCheck: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = WebSocketFrame

    /// A violation or a close frame was read: the connection is ending.
    private var ended = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !ended else { return }
        let frame = Self.unwrapInboundIn(data)
        context.fireUserInboundEventTriggered(WebSocketFrameHeard())
        if let violation = Self.violation(frame) {
            ended = true
            context.fireErrorCaught(violation)
            return
        }
        if frame.opcode == .connectionClose { ended = true }
        context.fireChannelRead(data)
    }

    /// Whether `frame` breaks a per-frame rule, and which.
    static func violation(_ frame: WebSocketFrame) -> WebSocketViolation? {
        guard frame.maskKey != nil else { return WebSocketViolation(.protocolError, "unmasked frame") }
        guard !frame.rsv1, !frame.rsv2, !frame.rsv3 else {
            return WebSocketViolation(.protocolError, "reserved bit set")
        }
        switch frame.opcode {
        case .text, .continuation, .connectionClose, .pong:
            return nil
        case .ping:
            return frame.fin ? nil : WebSocketViolation(.protocolError)
        case .binary:
            return WebSocketViolation(.unsupportedData, "binary messages are not accepted")
        default:
            return WebSocketViolation(.protocolError, "reserved opcode")
        }
    }
}
