// ClientClose: the relay's answer to a client's close frame (RFC 6455 sections 5.5.1 and 7.4).
//
// A well-formed close is echoed; a malformed one is itself a protocol error, answered with the
// code that says why. Either way the relay sends exactly one close frame, and never one of the
// codes reserved for reporting (1005, 1006, 1015).

import NIOCore

enum ClientClose {
    /// The close frame to send back for a client's close with this body.
    static func answer(to body: ByteBuffer) -> (code: CloseCode, reason: String) {
        var body = body
        switch body.readableBytes {
        case 0:
            return (.normal, "")  // no status: answered with 1000, never 1005
        case 1:
            return (.protocolError, "close frame with a 1-byte body")
        default:
            let code = body.readInteger(as: UInt16.self)!
            guard isAllowedOnTheWire(code) else { return (.protocolError, "close code \(code) is not allowed") }
            guard String(validating: body.readableBytesView, as: UTF8.self) != nil else {
                return (.invalidPayload, "close reason is not UTF-8")
            }
            return (code == CloseCode.goingAway.rawValue ? .goingAway : .normal, "")
        }
    }

    /// Codes a peer may send: 1000-1003, 1007-1014 (IANA's registry), 3000-4999. Not 1004
    /// (reserved), 1005, 1006 and 1015 (for reporting only, never sent), the rest of 1000-2999
    /// (unassigned protocol codes), nor anything outside 1000-4999 (no range defined).
    static func isAllowedOnTheWire(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1014, 3000...4999: true
        default: false
        }
    }
}
