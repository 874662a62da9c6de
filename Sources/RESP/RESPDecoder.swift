// RESPDecoder: an incremental RESP2 reply parser over a ByteBuffer.
//
// Replies arrive in arbitrary pieces: a pipelined reply can end in the middle
// of a length line, and an XREVRANGE reply of 100 events spans many reads. The
// decoder therefore never consumes a partial reply. It remembers how far it
// got (as LineBasedFrameDecoder remembers its scan offset), and it keeps no
// slices while waiting, so the caller's cumulation buffer stays uniquely
// referenced and appending to it does not copy.
//
// How it works:
//
//  * A "build" pass parses from the reader index and returns the value with
//    its payloads sliced out of the buffer. When the reply is complete (the
//    common case) that is the only pass.
//  * When bytes are missing, the build pass stops and leaves behind the offset
//    of the token it could not finish plus, for each open array, how many
//    elements are still due. Later calls "scan" onward from there, checking
//    syntax and counting elements without building anything. When the scan
//    completes the reply, one build pass runs over it. However the reply was
//    split, each byte is parsed at most twice (checked, then built); only the
//    short length line of a token still arriving is re-read on each call.
//  * Nesting is an explicit stack, not recursion; depth, array length, bulk
//    length and line length are capped, and every check depends only on the
//    bytes up to the one checked, so a reply split anywhere gives the same
//    value or the same error as the reply in one piece.
//  * Nothing is allocated from a declared length alone: an array reserves
//    at most one element per 3 bytes present (the smallest element, `+\r\n`).

import NIOCore

/// An incremental parser of RESP2 values (`+ - : $ *`, with null bulk strings and arrays).
///
/// Call ``decode(buffer:)`` each time bytes have been appended to the buffer. Between a `nil`
/// result and the next call, the buffer must keep its unread bytes and may gain more at its end,
/// which is what a `ByteToMessageDecoder` cumulation buffer does. Use one decoder per connection.
public struct RESPDecoder: Sendable {
    /// Array nesting allowed: at most this many arrays may enclose one another. Decoding never
    /// recurses, but comparing or releasing a value does, so keep this small.
    public let maximumDepth: Int
    /// Elements allowed in one array.
    public let maximumArrayLength: Int
    /// Bytes allowed in one bulk string (Redis itself allows 512 MiB).
    public let maximumBulkLength: Int
    /// Bytes allowed in one simple string or error line, excluding `+`/`-` and CRLF.
    public let maximumLineLength: Int

    /// How far a partial reply has been checked; nil when the next call starts a new reply.
    private var progress: Progress?

    /// Creates a decoder; every limit must be at least 0.
    ///
    /// - Parameters:
    ///   - maximumDepth: array nesting allowed (32).
    ///   - maximumArrayLength: elements allowed in one array (1,048,576).
    ///   - maximumBulkLength: bytes allowed in one bulk string (64 MiB).
    ///   - maximumLineLength: bytes allowed in one simple string or error (64 KiB).
    public init(
        maximumDepth: Int = 32,
        maximumArrayLength: Int = 1 << 20,
        maximumBulkLength: Int = 64 << 20,
        maximumLineLength: Int = 64 << 10
    ) {
        precondition(
            maximumDepth >= 0 && maximumArrayLength >= 0 && maximumBulkLength >= 0 && maximumLineLength >= 0,
            "RESPDecoder limits must not be negative")
        self.maximumDepth = maximumDepth
        self.maximumArrayLength = maximumArrayLength
        self.maximumBulkLength = maximumBulkLength
        self.maximumLineLength = maximumLineLength
    }

    /// Decodes the next complete value from the readable bytes of `buffer`.
    ///
    /// - Returns: the value, with the reader index moved past exactly its bytes; or `nil` when the
    ///   value is not complete yet, with the reader index untouched.
    /// - Throws: ``RESPError`` on bytes that are not RESP2 or exceed a limit; the reader index is
    ///   then untouched, and the connection should be closed.
    public mutating func decode(buffer: inout ByteBuffer) throws -> RESPValue? {
        // A partial reply: scan on from where the previous call stopped. If the caller broke the
        // contract and the buffer now holds fewer bytes than were checked, start over instead.
        if var progress = self.progress, progress.offset <= buffer.readableBytes {
            self.progress = nil
            let complete = try buffer.withUnsafeReadableBytes { bytes in
                try self.scan(bytes, &progress)
            }
            guard complete else {
                self.progress = progress
                return nil
            }
        }
        self.progress = nil
        let outcome = try buffer.withUnsafeReadableBytes { bytes in
            try self.build(bytes, slicing: buffer)
        }
        switch outcome {
        case .complete(let value, let end):
            buffer.moveReaderIndex(forwardBy: end)
            return value
        case .incomplete(let progress):
            self.progress = progress
            return nil
        }
    }
}

// MARK: - Tokens

extension RESPDecoder {
    /// Where a partial reply stands. Offsets are from the reader index (the reply's first byte).
    struct Progress: Sendable {
        /// Start of the first token not yet read completely.
        var offset: Int
        /// Where the search for that token's CRLF resumes (lines only; else `offset`).
        var searchFrom: Int
        /// Elements still due in each open array, outermost first.
        var remaining: [Int]
    }

    /// One header or scalar; ranges are byte offsets from the reply's first byte.
    enum Token {
        case simpleString(Range<Int>)
        case error(Range<Int>)
        case integer(Int64)
        case bulkString(Range<Int>?)
        case array(count: Int?)
    }

    enum TokenRead {
        /// A token and the offset just past it.
        case token(Token, end: Int)
        /// Bytes missing; a CRLF search may resume at `searchFrom`.
        case needMore(searchFrom: Int)
    }

    enum BuildOutcome {
        case complete(RESPValue, end: Int)
        case incomplete(Progress)
    }

    private static let cr = UInt8(ascii: "\r")
    private static let lf = UInt8(ascii: "\n")

    /// Reads the token starting at `start`; `depth` is the number of arrays open around it.
    func readToken(
        _ bytes: UnsafeRawBufferPointer, at start: Int, searchFrom: Int, depth: Int
    ) throws -> TokenRead {
        guard start < bytes.count else { return .needMore(searchFrom: start) }
        let type = bytes[start]
        switch type {
        case UInt8(ascii: "+"), UInt8(ascii: "-"):
            var index = max(searchFrom, start + 1)
            while index < bytes.count {
                let byte = bytes[index]
                if byte == Self.cr {
                    guard index + 1 < bytes.count else { return .needMore(searchFrom: index) }
                    guard bytes[index + 1] == Self.lf else { throw RESPError(.missingCRLF, offset: index + 1) }
                    let range = (start + 1)..<index
                    let token: Token = type == UInt8(ascii: "+") ? .simpleString(range) : .error(range)
                    return .token(token, end: index + 2)
                }
                if byte == Self.lf { throw RESPError(.missingCRLF, offset: index) }
                if index - start > self.maximumLineLength {
                    throw RESPError(.lineTooLong(limit: self.maximumLineLength), offset: index)
                }
                index += 1
            }
            return .needMore(searchFrom: index)

        case UInt8(ascii: ":"):
            guard let (value, end) = try Self.readDecimal(bytes, from: start + 1, invalid: .badInteger) else {
                return .needMore(searchFrom: start)
            }
            return .token(.integer(value), end: end)

        case UInt8(ascii: "$"):
            guard let (declared, end) = try Self.readDecimal(bytes, from: start + 1, invalid: .badLength) else {
                return .needMore(searchFrom: start)
            }
            if declared == -1 { return .token(.bulkString(nil), end: end) }
            guard declared >= 0 else { throw RESPError(.badLength, offset: start + 1) }
            guard declared <= self.maximumBulkLength else {
                throw RESPError(.bulkTooLong(length: declared, limit: self.maximumBulkLength), offset: start + 1)
            }
            // Compared with what is present before adding, so that no limit can overflow an Int.
            let length = Int(declared)
            let present = bytes.count - end
            // Check the CR and the LF as soon as each is present, so that the error does not
            // depend on how the reply was split.
            if length < present, bytes[end + length] != Self.cr {
                throw RESPError(.missingCRLF, offset: end + length)
            }
            if length < present - 1, bytes[end + length + 1] != Self.lf {
                throw RESPError(.missingCRLF, offset: end + length + 1)
            }
            guard length <= present - 2 else { return .needMore(searchFrom: start) }
            return .token(.bulkString(end..<(end + length)), end: end + length + 2)

        case UInt8(ascii: "*"):
            guard depth < self.maximumDepth else {
                throw RESPError(.tooDeep(limit: self.maximumDepth), offset: start)
            }
            guard let (count, end) = try Self.readDecimal(bytes, from: start + 1, invalid: .badLength) else {
                return .needMore(searchFrom: start)
            }
            if count == -1 { return .token(.array(count: nil), end: end) }
            guard count >= 0 else { throw RESPError(.badLength, offset: start + 1) }
            guard count <= self.maximumArrayLength else {
                throw RESPError(.arrayTooLong(length: count, limit: self.maximumArrayLength), offset: start + 1)
            }
            return .token(.array(count: Int(count)), end: end)

        default:
            throw RESPError(.badTypeByte(type), offset: start)
        }
    }

    /// Reads `-?[0-9]{1,19}\r\n` starting at `from`: the value and the offset past the LF, or nil
    /// when the line is not complete yet. Out-of-range values and other bytes throw `invalid`.
    static func readDecimal(
        _ bytes: UnsafeRawBufferPointer, from: Int, invalid: RESPError.Reason
    ) throws -> (Int64, end: Int)? {
        var index = from
        var negative = false
        if index < bytes.count, bytes[index] == UInt8(ascii: "-") {
            negative = true
            index += 1
        }
        let firstDigit = index
        var value: Int64 = 0
        while index < bytes.count {
            let byte = bytes[index]
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"):
                // 19 digits hold every Int64; more are refused without waiting for the CRLF.
                guard index - firstDigit < 19 else { throw RESPError(invalid, offset: index) }
                let digit = Int64(byte &- UInt8(ascii: "0"))
                let (times10, overflow1) = value.multipliedReportingOverflow(by: 10)
                let (next, overflow2) =
                    negative ? times10.subtractingReportingOverflow(digit) : times10.addingReportingOverflow(digit)
                guard !overflow1, !overflow2 else { throw RESPError(invalid, offset: index) }
                value = next
                index += 1
            case Self.cr:
                guard index > firstDigit else { throw RESPError(invalid, offset: index) }
                guard index + 1 < bytes.count else { return nil }
                guard bytes[index + 1] == Self.lf else { throw RESPError(.missingCRLF, offset: index + 1) }
                return (value, index + 2)
            case Self.lf:
                throw RESPError(.missingCRLF, offset: index)
            default:
                throw RESPError(invalid, offset: index)
            }
        }
        return nil
    }
}

// MARK: - The two passes

extension RESPDecoder {
    /// Parses one value from offset 0 and slices its payloads out of `buffer` (whose readable
    /// bytes are `bytes`); or, when bytes are missing, says how far it got.
    func build(_ bytes: UnsafeRawBufferPointer, slicing buffer: ByteBuffer) throws -> BuildOutcome {
        var open: [(remaining: Int, elements: [RESPValue])] = []
        var offset = 0

        func slice(_ range: Range<Int>) -> ByteBuffer {
            // In range by construction: the token was read from these readable bytes.
            guard let slice = buffer.getSlice(at: buffer.readerIndex + range.lowerBound, length: range.count) else {
                preconditionFailure("RESP token outside the readable bytes")
            }
            return slice
        }

        while true {
            let token: Token
            switch try self.readToken(bytes, at: offset, searchFrom: offset, depth: open.count) {
            case .needMore(let searchFrom):
                return .incomplete(Progress(offset: offset, searchFrom: searchFrom, remaining: open.map(\.remaining)))
            case .token(let read, let end):
                token = read
                offset = end
            }

            var value: RESPValue
            switch token {
            case .simpleString(let range): value = .simpleString(slice(range))
            case .error(let range): value = .error(slice(range))
            case .integer(let integer): value = .integer(integer)
            case .bulkString(let range): value = .bulkString(range.map(slice))
            case .array(count: nil): value = .array(nil)
            case .array(count: 0): value = .array([])
            case .array(count: let count?):
                var elements: [RESPValue] = []
                elements.reserveCapacity(Self.elementsToReserve(declared: count, bytesPresent: bytes.count - offset))
                open.append((count, elements))
                continue
            }

            // Hand the finished value to the arrays around it, closing those it completes.
            while let top = open.indices.last {
                open[top].elements.append(value)
                open[top].remaining -= 1
                guard open[top].remaining == 0 else { break }
                value = .array(open.removeLast().elements)
            }
            if open.isEmpty {
                return .complete(value, end: offset)
            }
        }
    }

    /// Room to reserve for an array of `declared` elements when `bytesPresent` bytes follow its
    /// header: never more than those bytes can hold, as the smallest element (`+\r\n`) is 3 bytes.
    static func elementsToReserve(declared: Int, bytesPresent: Int) -> Int {
        min(declared, bytesPresent / 3)
    }

    /// Checks the tokens from `progress.offset` on without building values.
    /// - Returns: true when the reply is complete (then `progress.offset` is its end).
    func scan(_ bytes: UnsafeRawBufferPointer, _ progress: inout Progress) throws -> Bool {
        while true {
            switch try self.readToken(
                bytes, at: progress.offset, searchFrom: progress.searchFrom, depth: progress.remaining.count)
            {
            case .needMore(let searchFrom):
                progress.searchFrom = searchFrom
                return false
            case .token(let token, let end):
                progress.offset = end
                progress.searchFrom = end
                if case .array(count: let count?) = token, count > 0 {
                    progress.remaining.append(count)
                    continue
                }
                // A value finished: count it in the enclosing arrays, closing those it completes.
                while let top = progress.remaining.indices.last {
                    progress.remaining[top] -= 1
                    guard progress.remaining[top] == 0 else { break }
                    progress.remaining.removeLast()
                }
                if progress.remaining.isEmpty {
                    return true
                }
            }
        }
    }
}
