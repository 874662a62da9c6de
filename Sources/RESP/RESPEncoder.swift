// RESPEncoder: commands to Redis, written as RESP2 arrays of bulk strings.
//
// A command is `*<count>\r\n` followed by each argument as `$<length>\r\n<bytes>\r\n`,
// which is all a client ever sends. The relay sends one EVALSHA per event line,
// about ten arguments of which one is the event (a slice of the ingest buffer),
// so the hot path takes its arguments as a parameter pack: no array of
// arguments, no String built for numbers, and each payload written once,
// straight into the outbound buffer.

import NIOCore

/// A value that can be sent as one argument of a command: one bulk string.
///
/// Strings are sent as UTF-8, integers in decimal, bytes and buffers as they are.
public protocol RESPArgument {
    /// Writes this argument as one bulk string, `$<length>\r\n<bytes>\r\n`.
    func writeRESPBulkString(into buffer: inout ByteBuffer)
}

/// Writes Redis commands.
public enum RESPCommand {
    /// Writes the command whose name and arguments are `arguments`, in order.
    ///
    ///     RESPCommand.encode(["SET", "k", "v"], into: &buffer)
    ///     // *3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n
    public static func encode<Arguments: Collection>(_ arguments: Arguments, into buffer: inout ByteBuffer)
    where Arguments.Element: RESPArgument {
        writeHeader(count: arguments.count, into: &buffer)
        for argument in arguments {
            argument.writeRESPBulkString(into: &buffer)
        }
    }

    /// Writes a command whose arguments are of mixed types, e.g. a name, keys and a buffer.
    public static func encode(_ arguments: [any RESPArgument], into buffer: inout ByteBuffer) {
        writeHeader(count: arguments.count, into: &buffer)
        for argument in arguments {
            argument.writeRESPBulkString(into: &buffer)
        }
    }

    /// Writes a command of a fixed number of arguments of any argument types, without building an
    /// array: the hot path.
    ///
    ///     RESPCommand.encode("EVALSHA", sha, 4, metaKey, historyKey, indexKey, nodeKey, "pub", line,
    ///                        into: &buffer)
    public static func encode<each Argument: RESPArgument>(
        _ argument: repeat each Argument, into buffer: inout ByteBuffer
    ) {
        var count = 0
        for _ in repeat each argument {
            count += 1
        }
        writeHeader(count: count, into: &buffer)
        repeat (each argument).writeRESPBulkString(into: &buffer)
    }

    /// Writes `*<count>\r\n`, the start of a command of `count` arguments. Follow it with exactly
    /// `count` calls of ``RESPArgument/writeRESPBulkString(into:)``, for commands whose arguments
    /// are produced by a loop.
    public static func writeHeader(count: Int, into buffer: inout ByteBuffer) {
        precondition(count >= 0, "a command cannot have a negative number of arguments")
        buffer.writeInteger(UInt8(ascii: "*"))
        buffer.writeDecimal(UInt64(count))
        buffer.writeCRLF()
    }
}

// MARK: - Arguments

extension ByteBuffer {
    /// Writes `$<length>\r\n`.
    mutating func writeBulkHeader(length: Int) {
        self.writeInteger(UInt8(ascii: "$"))
        self.writeDecimal(UInt64(length))
        self.writeCRLF()
    }
}

extension ByteBuffer: RESPArgument {
    /// Writes the readable bytes (left untouched) as one bulk string, copying them once, into `buffer`.
    public func writeRESPBulkString(into buffer: inout ByteBuffer) {
        buffer.writeBulkHeader(length: self.readableBytes)
        buffer.writeImmutableBuffer(self)
        buffer.writeCRLF()
    }
}

extension String: RESPArgument {
    /// Writes the UTF-8 bytes as one bulk string.
    public func writeRESPBulkString(into buffer: inout ByteBuffer) {
        buffer.writeBulkHeader(length: self.utf8.count)
        buffer.writeString(self)
        buffer.writeCRLF()
    }
}

extension Substring: RESPArgument {
    /// Writes the UTF-8 bytes as one bulk string.
    public func writeRESPBulkString(into buffer: inout ByteBuffer) {
        buffer.writeBulkHeader(length: self.utf8.count)
        buffer.writeSubstring(self)
        buffer.writeCRLF()
    }
}

extension Array: RESPArgument where Element == UInt8 {
    /// Writes the bytes as one bulk string.
    public func writeRESPBulkString(into buffer: inout ByteBuffer) {
        buffer.writeBulkHeader(length: self.count)
        buffer.writeBytes(self)
        buffer.writeCRLF()
    }
}

extension ArraySlice: RESPArgument where Element == UInt8 {
    /// Writes the bytes as one bulk string.
    public func writeRESPBulkString(into buffer: inout ByteBuffer) {
        buffer.writeBulkHeader(length: self.count)
        buffer.writeBytes(self)
        buffer.writeCRLF()
    }
}

extension Int: RESPArgument {
    /// Writes the value in decimal as one bulk string, e.g. `$2\r\n42\r\n`.
    public func writeRESPBulkString(into buffer: inout ByteBuffer) {
        Int64(self).writeRESPBulkString(into: &buffer)
    }
}

extension Int64: RESPArgument {
    /// Writes the value in decimal as one bulk string, e.g. `$2\r\n42\r\n`.
    public func writeRESPBulkString(into buffer: inout ByteBuffer) {
        let sign = self < 0 ? 1 : 0
        buffer.writeBulkHeader(length: sign + decimalDigitCount(self.magnitude))
        buffer.writeDecimal(self)
        buffer.writeCRLF()
    }
}

extension UInt64: RESPArgument {
    /// Writes the value in decimal as one bulk string, e.g. `$2\r\n42\r\n`.
    public func writeRESPBulkString(into buffer: inout ByteBuffer) {
        buffer.writeBulkHeader(length: decimalDigitCount(self))
        buffer.writeDecimal(self)
        buffer.writeCRLF()
    }
}

/// The number of decimal digits of `value` (1 for 0).
func decimalDigitCount(_ value: UInt64) -> Int {
    var count = 1
    var rest = value
    while rest >= 10 {
        rest /= 10
        count += 1
    }
    return count
}
