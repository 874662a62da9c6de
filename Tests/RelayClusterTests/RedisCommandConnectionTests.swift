// RedisCommandConnection against a real redis-server (Unix socket, and once
// TCP with AUTH and SELECT), and its handler in an EmbeddedChannel for what a
// real server does not send (bytes that are not RESP, a reply nobody asked for).
// What is proven: replies in order under pipelining, a reply error fails only
// its command, the bounds refuse at once, and a lost connection fails every
// waiting command and every later one.

import Foundation
import NIOCore
import NIOEmbedded
import NIOPosix
import RESP
import Testing

@testable import RelayCluster

@Suite(.enabled(if: redisServerPath != nil, "redis-server is not installed"))
struct RedisCommandConnectionTests {
    @Test func pipelinedRepliesInOrderAndReplyErrorsFailOnlyTheirCommand() async throws {
        try await withRedis { _, redis in
            #expect(redis.runID.count == 40 && redis.runID.allSatisfy(\.isHexDigit))
            var futures: [EventLoopFuture<RESPValue>] = []
            for i in 0..<300 {
                switch i % 3 {
                case 0: futures.append(redis.send("SET", "k\(i)", "v\(i)"))
                case 1: futures.append(redis.send("GET", "k\(i - 1)"))
                default: futures.append(redis.send("INCR", "k\(i - 2)"))  // not an integer: an error reply
                }
            }
            for (i, future) in futures.enumerated() {
                switch i % 3 {
                case 0: #expect(try await future.get() == .simpleString(ByteBuffer(string: "OK")))
                case 1: #expect(try await future.get() == bulk("v\(i - 1)"))
                default:
                    await #expect {
                        _ = try await future.get()
                    } throws: { error in
                        guard let error = error as? RedisReplyError else { return false }
                        return error.code == "ERR" && error.message.contains("not an integer")
                    }
                }
            }

            // Sent on the event loop (written in place) and off it (handed over), interleaved.
            let onLoop = try await redis.eventLoop.flatSubmit {
                let first = redis.send { RESPCommand.encode("RPUSH", "list", "a", into: &$0) }
                let second = redis.send("RPUSH", "list", "b")
                return first.and(second)
            }.get()
            #expect(onLoop.0 == .integer(1) && onLoop.1 == .integer(2))
            #expect(try await redis.send("LRANGE", "list", "0", "-1").get() == .array([bulk("a"), bulk("b")]))
        }
    }

    @Test func tcpWithAuthAndDatabase() async throws {
        let server = try RedisTestServer(transport: .tcp, extraArguments: ["--requirepass", "top secret"])
        defer { server.stop() }
        guard case .tcp(let host, let port) = server.endpoint.address else { return }

        let db3 = try await server.connect(endpoint: RedisEndpoint(parsing: "redis://:top%20secret@\(host):\(port)/3"))
        #expect(try await db3.send("SET", "where", "db3").get() == .simpleString(ByteBuffer(string: "OK")))
        #expect(db3.runID.count == 40)
        let db0 = try await server.connect(endpoint: RedisEndpoint(parsing: "redis://:top%20secret@\(host):\(port)"))
        #expect(try await db0.send("GET", "where").get() == .bulkString(nil))
        #expect(db0.runID == db3.runID)

        // A user of the ACL.
        #expect(try await db0.send("ACL", "SETUSER", "relay", "on", ">pw", "~*", "&*", "+@all").get().text == "OK")
        let user = try await server.connect(endpoint: RedisEndpoint(parsing: "redis://relay:pw@\(host):\(port)/3"))
        #expect(try await user.send("GET", "where").get() == bulk("db3"))

        // Refused logins fail the connect with the step that failed, and close the channel.
        await #expect {
            _ = try await server.connect(endpoint: RedisEndpoint(parsing: "redis://:wrong@\(host):\(port)"))
        } throws: { error in
            guard case .handshakeFailed(let step, let reason) = error as? RedisConnectionError else { return false }
            return step == "AUTH" && reason.contains("WRONGPASS")
        }
        await #expect {
            _ = try await server.connect(endpoint: RedisEndpoint(parsing: "redis://:top%20secret@\(host):\(port)/99"))
        } throws: { error in
            guard case .handshakeFailed(let step, _) = error as? RedisConnectionError else { return false }
            return step == "SELECT 99"
        }
        await #expect {
            _ = try await server.connect(endpoint: RedisEndpoint(parsing: "redis://\(host):\(port)"))
        } throws: { error in
            guard case .handshakeFailed(let step, let reason) = error as? RedisConnectionError else { return false }
            return step == "INFO server" && reason.contains("NOAUTH")
        }
        for connection in [db3, db0, user] { try await connection.close().get() }
    }

    @Test func connectingToNoServerFails() async throws {
        let server = try RedisTestServer()
        let path = server.socketPath
        server.stop()
        await #expect(throws: (any Error).self) {
            _ = try await RedisCommandConnection.connect(
                to: RedisEndpoint(parsing: "unix://" + path), on: MultiThreadedEventLoopGroup.singleton.next(),
                logger: testLogger
            ).get()
        }
    }

    @Test func closingTheServerFailsPendingCommands() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let redis = try await server.connect()
        // BLPOP holds the connection; the PINGs queue behind it.
        let blocked = redis.send("BLPOP", "nothing", "0")
        let queued = (0..<10).map { _ in redis.send("PING") }
        try await Task.sleep(for: .milliseconds(100))
        #expect(try await redis.eventLoop.submit { redis.outstandingCommands }.get() == 11)
        server.stop()

        // The server's end may close or reset (ECONNRESET when the kill races unread bytes): either
        // way every pending command fails with a connection error, which is what the caller needs.
        for future in [blocked] + queued {
            await #expect(throws: RedisConnectionError.self) { try await future.get() }
        }
        try await redis.closeFuture.get()
        await #expect(throws: RedisConnectionError.closed) { try await redis.send("PING").get() }
        try await redis.close().get()  // closing again is fine
    }

    @Test func boundsRefuseAtOnceAndRecover() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let redis = try await server.connect(maximumOutstandingCommands: 4, maximumOutstandingBytes: 1000)
        let other = try await server.connect()

        let blocked = redis.send("BLPOP", "list", "0")
        let waiting = (0..<3).map { redis.send("ECHO", "\($0)") }
        await #expect(throws: RedisConnectionError.tooManyOutstandingCommands(limit: 4)) {
            try await redis.send("PING").get()
        }
        // Waiting commands go on; a command refused by a bound was not sent at all.
        #expect(try await other.send("LPUSH", "list", "x").get() == .integer(1))
        #expect(try await blocked.get() == .array([bulk("list"), bulk("x")]))
        for (i, future) in waiting.enumerated() {
            #expect(try await future.get() == bulk("\(i)"))
        }

        // The byte bound: with BLPOP waiting, a 2000-byte command does not fit in 1000 bytes ...
        let big = String(repeating: "b", count: 2000)
        let blockedAgain = redis.send("BLPOP", "list", "0")
        await #expect(throws: RedisConnectionError.tooManyOutstandingBytes(limit: 1000)) {
            try await redis.send("SET", "big", big).get()
        }
        #expect(try await other.send("LPUSH", "list", "y").get() == .integer(1))
        _ = try await blockedAgain.get()
        // ... but alone it is sent: a command larger than the bound must still be possible.
        #expect(try await redis.send("SET", "big", big).get().text == "OK")
        #expect(try await other.send("STRLEN", "big").get() == .integer(2000))
        #expect(try await redis.eventLoop.submit { redis.outstandingCommands }.get() == 0)
        try await redis.close().get()
        try await other.close().get()
    }
}

/// The handler alone, fed bytes a real server would not send.
@Suite struct RedisCommandHandlerTests {
    private func makeChannel() throws -> (EmbeddedChannel, RedisCommandHandler) {
        let handler = RedisCommandHandler(maximumOutstandingCommands: 16, maximumOutstandingBytes: 1 << 20, logger: testLogger)
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandlers(ByteToMessageHandler(RESPValueDecoder()), handler)
        try channel.connect(to: SocketAddress(unixDomainSocketPath: "/nowhere")).wait()
        return (channel, handler)
    }

    private func enqueue(_ handler: RedisCommandHandler, on channel: EmbeddedChannel, _ arguments: [String]) -> EventLoopFuture<RESPValue> {
        let promise = channel.eventLoop.makePromise(of: RESPValue.self)
        handler.enqueue(promise: promise) { RESPCommand.encode(arguments, into: &$0) }
        return promise.futureResult
    }

    @Test func commandsOfOneTickLeaveInOneWrite() throws {
        let (channel, handler) = try makeChannel()
        let first = enqueue(handler, on: channel, ["GET", "a"])
        let second = enqueue(handler, on: channel, ["GET", "b"])
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)  // not before the end of the tick
        channel.embeddedEventLoop.run()
        let written = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(String(buffer: written) == "*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\n")
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)

        // Replies split across reads, an error reply in the middle.
        try channel.writeInbound(ByteBuffer(string: "-ERR no\r\n$1"))
        try channel.writeInbound(ByteBuffer(string: "\r\nB\r\n"))
        #expect(throws: RedisReplyError(message: "ERR no")) { try first.wait() }
        #expect(try second.wait() == bulk("B"))
        _ = try channel.finish()
    }

    @Test func bytesThatAreNotRESPFailEveryWaitingCommand() throws {
        let (channel, handler) = try makeChannel()
        let futures = (0..<3).map { enqueue(handler, on: channel, ["GET", "k\($0)"]) }
        channel.embeddedEventLoop.run()
        _ = try? channel.writeInbound(ByteBuffer(string: "$1\r\nA\r\n?garbage\r\n"))
        #expect(try futures[0].wait() == bulk("A"))
        for future in futures.dropFirst() {
            #expect {
                try future.wait()
            } throws: { error in
                guard case .protocolError(let reason) = error as? RedisConnectionError else { return false }
                return reason.contains("bad type byte 0x3f")
            }
        }
        #expect(!channel.isActive)
        #expect(throws: RedisConnectionError.self) { try enqueue(handler, on: channel, ["PING"]).wait() }
    }

    @Test func aReplyNobodyAskedForClosesTheConnection() throws {
        let (channel, handler) = try makeChannel()
        try channel.writeInbound(ByteBuffer(string: "+OK\r\n"))
        #expect(!channel.isActive)
        #expect {
            try enqueue(handler, on: channel, ["PING"]).wait()
        } throws: { error in
            guard case .unexpectedReply(let reply) = error as? RedisConnectionError else { return false }
            return reply == "OK"
        }
    }

    @Test func anEmptyCommandIsRefused() throws {
        let (channel, handler) = try makeChannel()
        let promise = channel.eventLoop.makePromise(of: RESPValue.self)
        handler.enqueue(promise: promise) { _ in }
        #expect(throws: RedisConnectionError.emptyCommand) { try promise.futureResult.wait() }
        #expect(handler.outstandingCommands == 0)
        _ = try channel.finish()
    }
}
