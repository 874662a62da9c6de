// FragmentAssembler: puts a fragmented client text message back together, within bounds.
//
// RFC 6455 lets a message be split into any number of frames of any size, so without a bound a
// client could make the relay do a frame's work (decode, unmask, append) for every byte it sends.
// Control frames between fragments are the handler's business; they never reach this.

import NIOCore
import NIOWebSocket

struct FragmentAssembler {
    /// Frames one message may be split into. Browsers never fragment what they send, and client
    /// libraries split at their buffer size (kilobytes): 128 frames of a 64 KiB message is 512
    /// bytes a frame, more than any of them uses.
    static let maxFragments = 128
    /// Smallest non-final fragment. A masked client frame header is 6 to 14 bytes: a fragment
    /// under 16 bytes would carry no more payload than header, which no writer does on purpose.
    /// The final fragment may be any size (it holds whatever is left).
    static let minimumFragmentBytes = 16

    enum Outcome {
        /// A whole message (not yet checked for size or UTF-8: the handler does that for all).
        case message(ByteBuffer)
        /// More fragments must follow.
        case pending
        /// The connection ends with this code.
        case refused(CloseCode, String)
    }

    let maxMessageBytes: Int
    private var buffer: ByteBuffer?
    private var fragments = 0

    init(maxMessageBytes: Int) {
        self.maxMessageBytes = maxMessageBytes
    }

    /// A text frame: a whole message, or the first fragment of one.
    mutating func text(_ frame: WebSocketFrame) -> Outcome {
        guard buffer == nil else { return refuse(.protocolError, "new message inside a fragmented one") }
        if frame.fin { return .message(frame.unmaskedData) }
        guard frame.length >= Self.minimumFragmentBytes else { return refuse(.protocolError, Self.tooSmall) }
        buffer = frame.unmaskedData
        fragments = 1
        return .pending
    }

    /// A continuation frame.
    mutating func continuation(_ frame: WebSocketFrame) -> Outcome {
        guard var assembled = buffer else { return refuse(.protocolError, "continuation without a start") }
        fragments += 1
        guard fragments <= Self.maxFragments else {
            return refuse(.protocolError, "more than \(Self.maxFragments) fragments")
        }
        guard frame.fin || frame.length >= Self.minimumFragmentBytes else { return refuse(.protocolError, Self.tooSmall) }
        guard assembled.readableBytes + frame.length <= maxMessageBytes else { return refuse(.messageTooBig, "") }
        var data = frame.unmaskedData
        buffer = nil  // so that the append below does not copy a shared buffer
        assembled.writeBuffer(&data)
        if frame.fin {
            fragments = 0
            return .message(assembled)
        }
        buffer = assembled
        return .pending
    }

    private static let tooSmall = "non-final fragment under \(minimumFragmentBytes) bytes"

    private mutating func refuse(_ code: CloseCode, _ reason: String) -> Outcome {
        buffer = nil
        fragments = 0
        return .refused(code, reason)
    }
}
