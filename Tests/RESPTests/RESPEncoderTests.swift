// Tests of RESPCommand: known commands byte for byte, every argument type, and
// that what the encoder writes the decoder reads back as the same arguments.

import NIOCore
import Testing

@testable import RESP

private func written(_ write: (inout ByteBuffer) -> Void) -> String {
    var buffer = ByteBuffer()
    write(&buffer)
    return String(decoding: buffer.readableBytesView, as: UTF8.self)
}

@Suite("RESPCommand")
struct RESPEncoderTests {
    @Test func setKeyValue() {
        let expected = "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
        #expect(written { RESPCommand.encode(["SET", "k", "v"], into: &$0) } == expected)
        #expect(written { RESPCommand.encode("SET", "k", "v", into: &$0) } == expected)
        #expect(written { RESPCommand.encode([bytes("SET"), bytes("k"), bytes("v")], into: &$0) } == expected)
        #expect(
            written {
                RESPCommand.encode([ByteBuffer(string: "SET"), ByteBuffer(string: "k"), ByteBuffer(string: "v")], into: &$0)
            } == expected)
        #expect(written { RESPCommand.encode(["SET", bytes("k"), ByteBuffer(string: "v")], into: &$0) } == expected)
    }

    @Test func knownCommands() {
        #expect(written { RESPCommand.encode("PING", into: &$0) } == "*1\r\n$4\r\nPING\r\n")
        #expect(
            written { RESPCommand.encode("SET", "P:sweep", "node-1", "NX", "EX", 60, into: &$0) }
                == "*6\r\n$3\r\nSET\r\n$7\r\nP:sweep\r\n$6\r\nnode-1\r\n$2\r\nNX\r\n$2\r\nEX\r\n$2\r\n60\r\n")
        #expect(
            written { RESPCommand.encode(["SUBSCRIBE", "P:t:a", "P:t:b"], into: &$0) }
                == "*3\r\n$9\r\nSUBSCRIBE\r\n$5\r\nP:t:a\r\n$5\r\nP:t:b\r\n")
        #expect(written { RESPCommand.encode([String](), into: &$0) } == "*0\r\n")
        #expect(written { RESPCommand.encode("GET", "", into: &$0) } == "*2\r\n$3\r\nGET\r\n$0\r\n\r\n")
        #expect(written { RESPCommand.encode("SET", "κλειδί", "✓", into: &$0) } == "*3\r\n$3\r\nSET\r\n$12\r\nκλειδί\r\n$3\r\n✓\r\n")
    }

    @Test func theEvalshaHotPath() {
        // The relay's per-line call: a slice of the ingest buffer (reader index not at 0, bytes
        // around it that must not leak in) among strings and numbers.
        var ingest = ByteBuffer(string: "garbage{\"topic\":\"t\",\"n\":1}\nmore")
        ingest.moveReaderIndex(forwardBy: 7)
        let line = ingest.getSlice(at: ingest.readerIndex, length: 19)!
        let sha = "e0e1f9fabfc9d4800c877a703b823ac0578ff831"
        let expected =
            "*14\r\n$7\r\nEVALSHA\r\n$40\r\n\(sha)\r\n$1\r\n4\r\n$7\r\nP:m:{t}\r\n$7\r\nP:h:{t}\r\n"
            + "$8\r\nP:topics\r\n$6\r\nP:n:n1\r\n$3\r\npub\r\n$1\r\nt\r\n$5\r\nP:t:t\r\n$6\r\nrunid1\r\n"
            + "$100\r\n\(String(repeating: "e", count: 100))\r\n$19\r\n{\"topic\":\"t\",\"n\":1}\r\n$20\r\n18446744073709551615\r\n"
        let text = written {
            RESPCommand.encode(
                "EVALSHA", sha, 4, "P:m:{t}", "P:h:{t}", "P:topics", "P:n:n1", "pub", Substring("t"), "P:t:t",
                bytes("runid1"), Array(repeating: UInt8(ascii: "e"), count: 100)[...], line, UInt64.max, into: &$0)
        }
        #expect(text == expected)
        #expect(ingest.readerIndex == 7 && line.readableBytes == 19, "the source buffers are left as they were")
    }

    @Test func integers() {
        let cases: [(any RESPArgument, String)] = [
            (0, "0"), (7, "7"), (10, "10"), (-1, "-1"), (Int.max, "9223372036854775807"),
            (Int.min, "-9223372036854775808"), (Int64.min, "-9223372036854775808"), (UInt64(0), "0"),
            (UInt64.max, "18446744073709551615"), (Int64(1_000_000), "1000000"),
        ]
        for (argument, decimal) in cases {
            #expect(written { RESPCommand.encode([argument], into: &$0) } == "*1\r\n$\(decimal.utf8.count)\r\n\(decimal)\r\n")
        }
    }

    @Test func binaryArgumentsAreWrittenAsTheyAre() throws {
        let binary: [UInt8] = Array(0...255) + [13, 10, 13, 10]
        var buffer = ByteBuffer()
        RESPCommand.encode("SET", bytes("bin"), binary, into: &buffer)
        #expect(Array(buffer.readableBytesView) == bytes("*3\r\n$3\r\nSET\r\n$3\r\nbin\r\n$260\r\n") + binary + bytes("\r\n"))
    }

    @Test func headerThenArgumentsInALoop() {
        let keys = ["a", "b", "c"]
        let text = written { buffer in
            RESPCommand.writeHeader(count: 1 + keys.count, into: &buffer)
            "DEL".writeRESPBulkString(into: &buffer)
            for key in keys {
                key.writeRESPBulkString(into: &buffer)
            }
        }
        #expect(text == "*4\r\n$3\r\nDEL\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n")
    }

    @Test func commandsAppendToWhatIsInTheBuffer() {
        // Pipelining: several commands in one buffer, one write.
        let text = written { buffer in
            RESPCommand.encode("MULTI", into: &buffer)
            RESPCommand.encode("INCR", "x", into: &buffer)
            RESPCommand.encode("EXEC", into: &buffer)
        }
        #expect(text == "*1\r\n$5\r\nMULTI\r\n*2\r\n$4\r\nINCR\r\n$1\r\nx\r\n*1\r\n$4\r\nEXEC\r\n")
    }

    @Test func theDecoderReadsCommandsBackAsArraysOfBulkStrings() throws {
        var random = SplitMix64(state: 13)
        for _ in 0..<500 {
            let arguments: [[UInt8]] = (0..<Int.random(in: 0...12, using: &random)).map { _ in
                (0..<Int.random(in: 0...40, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
            }
            var buffer = ByteBuffer()
            RESPCommand.encode(arguments, into: &buffer)
            var decoder = RESPDecoder()
            let value = try decoder.decode(buffer: &buffer)
            #expect(value == .array(arguments.map { bulk($0) }))
            #expect(buffer.readableBytes == 0)
        }
    }
}
