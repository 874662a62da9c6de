// RESPError: why bytes from Redis could not be decoded.
//
// A RESP stream cannot be resynchronised after bad input (there is no frame
// marker to look for), so every error here means "close the connection". The
// reason and the byte offset are kept so the log says what arrived and where,
// rather than just "protocol error".

/// Input that is not valid RESP2, or that exceeds a limit of the ``RESPDecoder``.
///
/// After this error the connection's byte stream cannot be trusted any more: close it.
public struct RESPError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What was wrong.
    public enum Reason: Sendable, Hashable {
        /// The first byte of a value is none of `+ - : $ *`.
        case badTypeByte(UInt8)
        /// The body of an integer reply (`:`) is not a signed 64-bit decimal.
        case badInteger
        /// The length of a bulk string (`$`) or array (`*`) is not a decimal of at least -1.
        case badLength
        /// A line or a bulk payload is not followed by CR LF, or a line holds a lone CR or LF.
        case missingCRLF
        /// Arrays are nested deeper than ``RESPDecoder/maximumDepth``.
        case tooDeep(limit: Int)
        /// A bulk string declares more bytes than ``RESPDecoder/maximumBulkLength``.
        case bulkTooLong(length: Int64, limit: Int)
        /// An array declares more elements than ``RESPDecoder/maximumArrayLength``.
        case arrayTooLong(length: Int64, limit: Int)
        /// A simple string or error line is longer than ``RESPDecoder/maximumLineLength``.
        case lineTooLong(limit: Int)
    }

    /// What was wrong.
    public var reason: Reason
    /// Offset of the offending byte from the first byte of the reply being decoded.
    public var offset: Int

    public init(_ reason: Reason, offset: Int) {
        self.reason = reason
        self.offset = offset
    }

    public var description: String {
        let what: String
        switch self.reason {
        case .badTypeByte(let byte):
            let hex = String(byte, radix: 16)
            what = "bad type byte 0x\(hex.count == 1 ? "0" + hex : hex), expected one of + - : $ *"
        case .badInteger:
            what = "bad integer, expected a signed 64-bit decimal"
        case .badLength:
            what = "bad length, expected a decimal of at least -1"
        case .missingCRLF:
            what = "missing CRLF"
        case .tooDeep(let limit):
            what = "arrays nested deeper than \(limit)"
        case .bulkTooLong(let length, let limit):
            what = "bulk string of \(length) bytes is longer than the limit of \(limit)"
        case .arrayTooLong(let length, let limit):
            what = "array of \(length) elements is longer than the limit of \(limit)"
        case .lineTooLong(let limit):
            what = "line longer than the limit of \(limit) bytes"
        }
        return "RESP: \(what) (at byte \(self.offset) of the reply)"
    }
}
