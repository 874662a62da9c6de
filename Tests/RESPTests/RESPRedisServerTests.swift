// The codec against a real redis-server: commands written by RESPCommand over a
// plain POSIX Unix socket, every reply decoded by RESPDecoder, with the replies
// read in small pieces so that real server output is split at many places.
// Each test starts its own server (RedisTestSupport) in a temporary directory
// and kills it at the end; without redis-server installed the tests are skipped, saying so.

import Foundation
import NIOCore
import RedisTestSupport
import Testing

@testable import RESP

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

private struct RedisTestFailure: Error, CustomStringConvertible {
    var description: String
}

/// `send(2)`, without SIGPIPE where the platform allows.
private func sendBytes(_ fd: Int32, _ bytes: UnsafeRawPointer, _ count: Int) -> Int {
    #if canImport(Glibc)
    Glibc.send(fd, bytes, count, Int32(MSG_NOSIGNAL))
    #else
    Darwin.send(fd, bytes, count, 0)
    #endif
}

/// A blocking client connection: encoded commands out, decoded replies in.
private final class RedisConnection {
    private let fd: Int32
    private var decoder = RESPDecoder()
    private var received = ByteBuffer()

    init(path: String) throws {
        #if canImport(Glibc)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #else
        let fd = socket(AF_UNIX, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { throw RedisTestFailure(description: "socket: errno \(errno)") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            close(fd)
            throw RedisTestFailure(description: "socket path too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
            raw[pathBytes.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            close(fd)
            throw RedisTestFailure(description: "connect \(path): errno \(errno)")
        }
        // A reply that never comes fails the test instead of hanging it.
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        self.fd = fd
    }

    deinit {
        close(self.fd)
    }

    func send(_ buffer: ByteBuffer) throws {
        try buffer.withUnsafeReadableBytes { bytes in
            var sent = 0
            while sent < bytes.count {
                let n = sendBytes(self.fd, bytes.baseAddress! + sent, bytes.count - sent)
                guard n > 0 else { throw RedisTestFailure(description: "send: errno \(errno)") }
                sent += n
            }
        }
    }

    /// Reads until `count` replies are decoded, `readSizes` bytes at a time (cycling).
    func replies(_ count: Int, readSizes: [Int] = [65536]) throws -> [RESPValue] {
        var replies: [RESPValue] = []
        var reads = 0
        while true {
            while replies.count < count, let value = try self.decoder.decode(buffer: &self.received) {
                replies.append(value)
            }
            if replies.count == count { return replies }
            let size = readSizes[reads % readSizes.count]
            reads += 1
            var n = 0
            self.received.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { raw in
                n = recv(self.fd, raw.baseAddress!, size, 0)
                return max(n, 0)
            }
            guard n > 0 else {
                throw RedisTestFailure(description: "recv returned \(n) (errno \(errno)) after \(replies.count) of \(count) replies")
            }
            self.received.discardReadBytes()
        }
    }

    /// Sends one command and returns its reply.
    func call<each Argument: RESPArgument>(_ argument: repeat each Argument) throws -> RESPValue {
        var buffer = ByteBuffer()
        RESPCommand.encode(repeat each argument, into: &buffer)
        try self.send(buffer)
        return try self.replies(1)[0]
    }
}

private func errorText(_ value: RESPValue) -> String? {
    if case .error(let text) = value { return String(buffer: text) }
    return nil
}

@Suite("RESP against redis-server", .enabled(if: redisServerPath != nil, "redis-server is not installed (looked in /usr/bin, /usr/local/bin, /opt/homebrew/bin and PATH)"))
struct RESPRedisServerTests {
    @Test func pipelinedCommandsAndEveryReplyShape() throws {
        let server = try RedisTestServer(directoryPrefix: "resp-tests")
        defer { server.stop() }
        let redis = try RedisConnection(path: server.socketPath)

        let line1 = bytes("{\"topic\":\"t\",\"n\":1}\r\n+OK\r\n")  // looks like RESP inside a payload
        let line2 = bytes("{\"topic\":\"t\",\"n\":2}")
        var commands = ByteBuffer()
        var expected: [(String, (RESPValue) -> Bool)] = []
        func command(_ name: String, _ arguments: [any RESPArgument], expect: @escaping (RESPValue) -> Bool) {
            RESPCommand.encode(arguments, into: &commands)
            expected.append((name, expect))
        }
        func command(_ name: String, _ arguments: [any RESPArgument], _ value: RESPValue) {
            command(name, arguments) { $0 == value }
        }

        command("PING", ["PING"], simple("PONG"))
        command("SET binary", ["SET", "bin", allBytes], simple("OK"))
        command("GET binary", ["GET", "bin"], bulk(allBytes))
        command("GET missing", ["GET", "missing"], .bulkString(nil))
        command("SET empty", ["SET", "empty", ""], simple("OK"))
        command("GET empty", ["GET", "empty"], bulk(""))
        command("INCRBY negative", ["INCRBY", "n", -5], .integer(-5))
        command("DEL missing", ["DEL", "missing"], .integer(0))
        command("HSET", ["HSET", "h", "f1", "v1", "f2", ""], .integer(2))
        command("HGETALL", ["HGETALL", "h"]) { value in
            guard case .array(let elements?) = value, elements.count == 4 else { return false }
            let pairs = stride(from: 0, to: 4, by: 2).map { "\(elements[$0])=\(elements[$0 + 1])" }
            return Set(pairs) == ["\"f1\"=\"v1\"", "\"f2\"=\"\""]
        }
        command("LRANGE empty", ["LRANGE", "nolist", 0, -1], .array([]))
        command("BLPOP timeout (null array)", ["BLPOP", "nolist", "0.01"], .array(nil))
        command(
            "EVAL nested arrays",
            ["EVAL", "return {1, {2, 'x', {}}, redis.status_reply('FINE'), false, -7, {{{{'deep'}}}}}", 0],
            .array([
                .integer(1), .array([.integer(2), bulk("x"), .array([])]), simple("FINE"), .bulkString(nil),
                .integer(-7), .array([.array([.array([.array([bulk("deep")])])])]),
            ]))
        command("EVAL error_reply", ["EVAL", "return redis.error_reply('MYERR boom')", 0], error("MYERR boom"))
        command("EVAL runtime error", ["EVAL", "return redis.call('INCR', KEYS[1])", 1, "bin"]) {
            errorText($0)?.hasPrefix("ERR") == true
        }
        command("EVALSHA unknown", ["EVALSHA", String(repeating: "0", count: 40), 0]) {
            errorText($0)?.hasPrefix("NOSCRIPT") == true
        }
        command("unknown command", ["NOSUCHCOMMAND", "x"]) { errorText($0)?.hasPrefix("ERR unknown command") == true }
        command("XADD 1", ["XADD", "s", "1-0", "d", line1], bulk("1-0"))
        command("XADD 2", ["XADD", "s", "2-0", "d", ByteBuffer(bytes: line2)], bulk("2-0"))
        command(
            "XREVRANGE", ["XREVRANGE", "s", "+", "-", "COUNT", 2],
            .array([
                .array([bulk("2-0"), .array([bulk("d"), bulk(line2)])]),
                .array([bulk("1-0"), .array([bulk("d"), bulk(line1)])]),
            ]))
        command("EXISTS", ["EXISTS", "bin", "empty", "missing"], .integer(2))

        // Everything in one write; replies read 1, 2, 3 ... 16 bytes at a time, so that the
        // server's output is split at almost every offset.
        try redis.send(commands)
        let replies = try redis.replies(expected.count, readSizes: Array(1...16))
        for ((name, check), reply) in zip(expected, replies) {
            #expect(check(reply), "\(name): \(reply)")
        }

        // The connection is still in step afterwards.
        #expect(try redis.call("ECHO", "after") == bulk("after"))
    }

    @Test func largeBulkStringsRoundTrip() throws {
        let server = try RedisTestServer(directoryPrefix: "resp-tests")
        defer { server.stop() }
        let redis = try RedisConnection(path: server.socketPath)

        let payload = (0..<(3 << 20) + 7).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) }
        #expect(try redis.call("SET", "big", payload) == simple("OK"))
        #expect(try redis.call("STRLEN", "big") == .integer(Int64(payload.count)))
        #expect(try redis.call("GET", "big") == bulk(payload))
        #expect(try redis.call("LPUSH", "list", payload, "small", payload) == .integer(3))
        #expect(try redis.call("LRANGE", "list", 0, -1) == .array([bulk(payload), bulk("small"), bulk(payload)]))
    }

    @Test func pubSubMessages() throws {
        let server = try RedisTestServer(directoryPrefix: "resp-tests")
        defer { server.stop() }
        let subscriber = try RedisConnection(path: server.socketPath)
        let publisher = try RedisConnection(path: server.socketPath)

        #expect(try subscriber.call("SUBSCRIBE", "P:t:x") == .array([bulk("subscribe"), bulk("P:t:x"), .integer(1)]))
        #expect(try subscriber.call("PSUBSCRIBE", "P:t:*") == .array([bulk("psubscribe"), bulk("P:t:*"), .integer(2)]))
        let message = bytes("7:AbCdEf012345:{\"topic\":\"x\"}\r\n")
        #expect(try publisher.call("PUBLISH", "P:t:x", message) == .integer(2))
        let pushed = try subscriber.replies(2, readSizes: [3, 5, 7])
        #expect(
            pushed == [
                .array([bulk("message"), bulk("P:t:x"), bulk(message)]),
                .array([bulk("pmessage"), bulk("P:t:*"), bulk("P:t:x"), bulk(message)]),
            ])
    }
}
