// WebSocketMessageCheck: the rules a whole client message must keep, after NIO's aggregator
// joined its fragments, and the one place where the errors of NIO's decoder and aggregator
// become close codes.
//
// A text message must be UTF-8 as a whole (a character may be split across fragments); a
// close frame's body is judged by ClientClose. What passes reaches the session as a
// `ClientInput`; a violation goes on as a `WebSocketViolation` error.

import NIOCore
import NIOWebSocket

/// What a subscriber's client said, once its frames passed the protocol checks.
enum ClientInput: Equatable {
    /// A whole text message, valid UTF-8.
    case text(ByteBuffer)
    case ping(payload: ByteBuffer)
    case pong
    /// The client's close frame; the relay answers with this code (a malformed close is
    /// answered with the code that says why).
    case close(CloseCode, reason: String)
}

final class WebSocketMessageCheck: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = ClientInput

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.input(Self.unwrapInboundIn(data)) {
        case .success(let input):
            context.fireChannelRead(Self.wrapInboundOut(input))
        case .failure(let violation):
            context.fireErrorCaught(violation)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.fireErrorCaught(Self.violation(for: error) ?? error)
    }

    /// A frame that passed WebSocketFrameCheck and the aggregator, as the session's input.
    static func input(_ frame: WebSocketFrame) -> Result<ClientInput, WebSocketViolation> {
        switch frame.opcode {
        case .text:
            let payload = frame.unmaskedData
            let valid =
                payload.readableBytesView.withContiguousStorageIfAvailable {
                    String(validating: $0, as: UTF8.self) != nil
                } ?? (String(validating: Array(payload.readableBytesView), as: UTF8.self) != nil)
            return valid ? .success(.text(payload)) : .failure(WebSocketViolation(.invalidPayload))
        case .ping:
            return .success(.ping(payload: frame.unmaskedData))
        case .pong:
            return .success(.pong)
        case .connectionClose:
            let answer = ClientClose.answer(to: frame.unmaskedData)
            return .success(.close(answer.code, reason: answer.reason))
        default:
            // WebSocketFrameCheck lets no other opcode through, and the aggregator turns
            // continuations into text.
            return .failure(WebSocketViolation(.protocolError, "reserved opcode"))
        }
    }

    /// The close code for an error of NIO's frame decoder or aggregator (docs/protocol.md:
    /// over the size 1009, any other framing error 1002); nil for an error that is not theirs.
    static func violation(for error: Error) -> WebSocketViolation? {
        switch error {
        case let violation as WebSocketViolation:
            return violation
        case NIOWebSocketError.invalidFrameLength:
            return WebSocketViolation(.messageTooBig)
        case is NIOWebSocketError:
            return WebSocketViolation(.protocolError)
        case let error as NIOWebSocketFrameAggregator.Error:
            switch error {
            case .accumulatedFrameSizeIsTooLarge:
                return WebSocketViolation(.messageTooBig)
            case .tooManyFragments:
                return WebSocketViolation(.protocolError, "more than \(SubscriberPipeline.maxFragments) fragments")
            case .nonFinalFragmentSizeIsTooSmall:
                return WebSocketViolation(
                    .protocolError, "non-final fragment under \(SubscriberPipeline.minimumFragmentBytes) bytes")
            case .receivedNewFrameWithoutFinishingPrevious:
                return WebSocketViolation(.protocolError, "new message inside a fragmented one")
            case .didReceiveFragmentBeforeReceivingTextOrBinaryFrame:
                return WebSocketViolation(.protocolError, "continuation without a start")
            }
        default:
            return nil
        }
    }
}
