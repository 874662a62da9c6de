// RESPValue: one RESP2 reply as the relay receives it from Redis.
//
// Every payload (simple string, error text, bulk string) is a slice of the
// buffer the reply was read from, not a copy: an event line that comes back in
// a pub/sub message or an XREVRANGE reply is handed on without being copied
// into an array or a String. Nulls stay distinct from empty values (`$-1` is
// not `$0`, `*-1` is not `*0`), as the relay's script replies rely on both.

import NIOCore

/// One RESP2 value: a reply from Redis, or an element of one.
///
/// Payloads are slices of the buffer they were decoded from (they share its storage).
public enum RESPValue: Sendable, Equatable {
    /// `+OK\r\n`: a status line, without its `+` and CRLF.
    case simpleString(ByteBuffer)
    /// `-ERR message\r\n`: an error reply, without its `-` and CRLF.
    case error(ByteBuffer)
    /// `:42\r\n`: a signed 64-bit integer.
    case integer(Int64)
    /// `$3\r\nabc\r\n`: a binary-safe string; `nil` for the null bulk string `$-1\r\n`.
    case bulkString(ByteBuffer?)
    /// `*2\r\n...`: an array of values; `nil` for the null array `*-1\r\n`.
    case array([RESPValue]?)
}

extension RESPValue {
    /// Whether this is the null bulk string or the null array.
    public var isNull: Bool {
        switch self {
        case .bulkString(nil), .array(nil): return true
        default: return false
        }
    }

    /// Writes this value in RESP2 encoding.
    ///
    /// For replies built in process (tests, fakes). A simple string or error must not
    /// contain CR or LF; that is not checked.
    public func encode(into buffer: inout ByteBuffer) {
        switch self {
        case .simpleString(let text):
            buffer.writeInteger(UInt8(ascii: "+"))
            buffer.writeImmutableBuffer(text)
            buffer.writeCRLF()
        case .error(let text):
            buffer.writeInteger(UInt8(ascii: "-"))
            buffer.writeImmutableBuffer(text)
            buffer.writeCRLF()
        case .integer(let value):
            buffer.writeInteger(UInt8(ascii: ":"))
            buffer.writeDecimal(value)
            buffer.writeCRLF()
        case .bulkString(nil):
            buffer.writeStaticString("$-1\r\n")
        case .bulkString(let payload?):
            payload.writeRESPBulkString(into: &buffer)
        case .array(nil):
            buffer.writeStaticString("*-1\r\n")
        case .array(let elements?):
            buffer.writeInteger(UInt8(ascii: "*"))
            buffer.writeDecimal(Int64(elements.count))
            buffer.writeCRLF()
            for element in elements {
                element.encode(into: &buffer)
            }
        }
    }
}

extension RESPValue: CustomStringConvertible {
    /// A one-line rendering in the style of `redis-cli`, for logs and test failures.
    /// Non-printable bytes are shown as `\xNN`.
    public var description: String {
        switch self {
        case .simpleString(let text): return Self.quoted(text, quote: "")
        case .error(let text): return "(error) " + Self.quoted(text, quote: "")
        case .integer(let value): return "(integer) \(value)"
        case .bulkString(nil), .array(nil): return "(nil)"
        case .bulkString(let payload?): return Self.quoted(payload, quote: "\"")
        case .array(let elements?):
            return "[" + elements.map(\.description).joined(separator: ", ") + "]"
        }
    }

    private static func quoted(_ bytes: ByteBuffer, quote: String) -> String {
        var out = quote
        for byte in bytes.readableBytesView {
            switch byte {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"):
                out += "\\" + String(UnicodeScalar(byte))
            case 0x20..<0x7F:
                out.unicodeScalars.append(UnicodeScalar(byte))
            default:
                let hex = String(byte, radix: 16)
                out += "\\x" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        return out + quote
    }
}

extension ByteBuffer {
    mutating func writeCRLF() {
        self.writeInteger(UInt16(0x0D0A))  // "\r\n", big endian
    }

    /// Writes `value` in decimal ASCII, without going through a String.
    mutating func writeDecimal(_ value: Int64) {
        if value < 0 {
            self.writeInteger(UInt8(ascii: "-"))
        }
        self.writeDecimal(value.magnitude)
    }

    /// Writes `value` in decimal ASCII, without going through a String.
    mutating func writeDecimal(_ value: UInt64) {
        var divisor: UInt64 = 1
        while value / divisor >= 10 {
            divisor &*= 10
        }
        var rest = value
        while divisor > 0 {
            self.writeInteger(UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: rest / divisor))
            rest %= divisor
            divisor /= 10
        }
    }
}
