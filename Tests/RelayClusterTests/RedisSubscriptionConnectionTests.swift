// RedisSubscriptionConnection against a real redis-server, and its handler in
// an EmbeddedChannel for what a real server does not readily show (the commands
// written, pushes nobody asked for, a close while confirmations are due).
// What is proven: confirmations complete the futures, messages arrive exactly
// and in order, patterns carry their pattern, unsubscribing stops delivery,
// large sets go out 512 channels per command, every way of losing the
// connection is reported through closeFuture and fails what is pending, and
// the liveness probe keeps a healthy connection and closes a deaf one.

import Foundation
import NIOCore
import NIOEmbedded
import NIOPosix
import RESP
import Testing

@testable import RelayCluster

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The messages a subscription connection hands on, as an async sequence.
private struct Inbox: Sendable {
    let stream: AsyncStream<RedisChannelMessage>
    let continuation: AsyncStream<RedisChannelMessage>.Continuation

    init() {
        (self.stream, self.continuation) = AsyncStream.makeStream(of: RedisChannelMessage.self)
    }
}

/// A subscription connection to `server` whose messages go to `inbox`; probes are published
/// through `redis` unless `publishProbe` says otherwise.
private func subscriber(
    _ server: RedisTestServer,
    _ redis: RedisCommandConnection,
    inbox: Inbox,
    probeChannel: String = "P:probe:test",
    probeInterval: TimeAmount = RedisSubscriptionConnection.defaultProbeInterval,
    probeTimeout: TimeAmount = RedisSubscriptionConnection.defaultProbeTimeout,
    publishProbe: (@Sendable () -> EventLoopFuture<Void>)? = nil
) async throws -> RedisSubscriptionConnection {
    let publish = publishProbe ?? { redis.send("PUBLISH", probeChannel, "probe").map { _ in } }
    let continuation = inbox.continuation
    return try await RedisSubscriptionConnection.connect(
        to: server.endpoint, on: MultiThreadedEventLoopGroup.singleton.next(), probeChannel: probeChannel,
        probeInterval: probeInterval, probeTimeout: probeTimeout, publishProbe: publish, logger: testLogger
    ) { message in
        continuation.yield(message)
    }.get()
}

/// The `name=value` fields of the one line of `CLIENT LIST TYPE pubsub`, or nil when there is none.
private func pubsubClient(_ redis: RedisCommandConnection) async throws -> [String: String]? {
    let list = try await redis.send("CLIENT", "LIST", "TYPE", "pubsub").get().text ?? ""
    guard let line = list.split(whereSeparator: \.isNewline).first else { return nil }
    var fields: [String: String] = [:]
    for pair in line.split(separator: " ") {
        let parts = pair.split(separator: "=", maxSplits: 1)
        fields[String(parts[0])] = parts.count > 1 ? String(parts[1]) : ""
    }
    return fields
}

// Serialized: the probe tests measure time, which the other tests' load would stretch.
@Suite(.enabled(if: redisServerPath != nil, "redis-server is not installed"), .serialized, .timeLimit(.minutes(1)))
struct RedisSubscriptionConnectionTests {
    @Test func subscribeThenPublishDeliversTheExactPayload() async throws {
        try await withRedis { server, redis in
            let inbox = Inbox()
            let sub = try await subscriber(server, redis, inbox: inbox)
            #expect(sub.runID == redis.runID)
            try await sub.subscribe(channels: ["P:t:a", "P:t:b"]).get()
            #expect(try await pubsubClient(redis)?["sub"] == "3")  // with the probe channel

            let line = "{\"op\":\"x\",\"text\":\"a:b\\r\\n\"}\r\n:\u{0}\u{FF}"
            #expect(try await redis.send("PUBLISH", "P:t:b", "7:Ep0ch:" + line).get() == .integer(1))
            var messages = inbox.stream.makeAsyncIterator()
            let message = try #require(await messages.next())
            #expect(String(buffer: message.channel) == "P:t:b")
            #expect(message.pattern == nil)
            #expect(message.payload == ByteBuffer(string: "7:Ep0ch:" + line))
            let payload = try message.relayPayload()
            #expect(payload.seq == 7 && payload.epoch == "Ep0ch" && payload.line == ByteBuffer(string: line))

            // Subscribing from the event loop, and an empty request, complete too.
            try await sub.eventLoop.flatSubmit { sub.subscribe(channels: ["P:t:c"]) }.get()
            try await sub.subscribe(channels: []).get()
            try await sub.close().get()
            try await sub.closeFuture.get()  // closed by its owner: succeeds
            await #expect(throws: RedisConnectionError.closed) { try await sub.subscribe(channels: ["x"]).get() }
        }
    }

    @Test func tenThousandMessagesKeepTheirOrder() async throws {
        try await withRedis { server, redis in
            let inbox = Inbox()
            let sub = try await subscriber(server, redis, inbox: inbox)
            try await sub.subscribe(channels: ["P:t:order"]).get()
            let count = 10_000
            // Pipelined, 1,000 at a time (the command connection's bound is 4,096).
            for start in stride(from: 1, through: count, by: 1000) {
                let replies = (start..<start + 1000).map { seq in
                    redis.send("PUBLISH", "P:t:order", "\(seq):e:line \(seq)")
                }
                for reply in replies { #expect(try await reply.get() == .integer(1)) }
            }
            var expected: UInt64 = 1
            for await message in inbox.stream {
                let payload = try message.relayPayload()
                #expect(payload.seq == expected && String(buffer: payload.line) == "line \(expected)")
                if payload.seq != expected || expected == UInt64(count) { break }
                expected += 1
            }
            #expect(expected == UInt64(count))
            try await sub.close().get()
        }
    }

    @Test func patternsCarryPatternAndChannelAndUnsubscribingStopsDelivery() async throws {
        try await withRedis { server, redis in
            let inbox = Inbox()
            let sub = try await subscriber(server, redis, inbox: inbox)
            var messages = inbox.stream.makeAsyncIterator()
            try await sub.psubscribe(patterns: ["P:t:task:*"]).get()
            try await sub.subscribe(channels: ["P:t:plain", "P:t:marker"]).get()

            #expect(try await redis.send("PUBLISH", "P:t:other", "1:e:no").get() == .integer(0))
            #expect(try await redis.send("PUBLISH", "P:t:task:42", "1:e:yes").get() == .integer(1))
            let matched = try #require(await messages.next())
            #expect(matched.pattern == ByteBuffer(string: "P:t:task:*"))
            #expect(matched.channel == ByteBuffer(string: "P:t:task:42"))
            #expect(matched.payload == ByteBuffer(string: "1:e:yes"))

            #expect(try await redis.send("PUBLISH", "P:t:plain", "1:e:plain").get() == .integer(1))
            #expect(await messages.next()?.payload == ByteBuffer(string: "1:e:plain"))

            // After the confirmations nothing more arrives for them: the marker comes next.
            try await sub.punsubscribe(patterns: ["P:t:task:*"]).get()
            try await sub.unsubscribe(channels: ["P:t:plain"]).get()
            #expect(try await redis.send("PUBLISH", "P:t:task:42", "2:e:late").get() == .integer(0))
            #expect(try await redis.send("PUBLISH", "P:t:plain", "2:e:late").get() == .integer(0))
            #expect(try await redis.send("PUBLISH", "P:t:marker", "1:e:marker").get() == .integer(1))
            let next = try #require(await messages.next())
            #expect(next.channel == ByteBuffer(string: "P:t:marker"))

            // Unsubscribing from a channel never subscribed is confirmed too.
            try await sub.unsubscribe(channels: ["P:t:never"]).get()
            #expect(try await sub.eventLoop.submit { sub.pendingCommands }.get() == 0)
            try await sub.close().get()
        }
    }

    @Test func twoThousandChannelsGoOutInFourCommandsAndAreAllConfirmed() async throws {
        try await withRedis { server, redis in
            let inbox = Inbox()
            let sub = try await subscriber(server, redis, inbox: inbox)
            #expect(try await redis.send("CONFIG", "RESETSTAT").get().text == "OK")
            let channels = (0..<2000).map { "P:t:many:\($0)" }
            try await sub.subscribe(channels: channels).get()
            #expect(try await pubsubClient(redis)?["sub"] == "2001")
            let stats = try await redis.send("INFO", "commandstats").get().text ?? ""
            #expect(stats.contains("cmdstat_subscribe:calls=4,"))

            // The last channel works.
            #expect(try await redis.send("PUBLISH", "P:t:many:1999", "1:e:last").get() == .integer(1))
            var messages = inbox.stream.makeAsyncIterator()
            #expect(await messages.next()?.channel == ByteBuffer(string: "P:t:many:1999"))

            try await sub.unsubscribe(channels: channels).get()
            #expect(try await pubsubClient(redis)?["sub"] == "1")
            let after = try await redis.send("INFO", "commandstats").get().text ?? ""
            #expect(after.contains("cmdstat_unsubscribe:calls=4,"))
            try await sub.close().get()
        }
    }

    @Test func clientKillClosesTheConnectionAndReportsIt() async throws {
        try await withRedis { server, redis in
            let sub = try await subscriber(server, redis, inbox: Inbox())
            try await sub.subscribe(channels: ["P:t:a"]).get()
            #expect(try await redis.send("CLIENT", "KILL", "TYPE", "pubsub").get() == .integer(1))
            await #expect {
                try await sub.closeFuture.get()
            } throws: { error in
                guard case .connectionLost(let reason) = error as? RedisSubscriptionError else { return false }
                return reason.isConnectionLost
            }
            await #expect(throws: RedisConnectionError.self) { try await sub.subscribe(channels: ["P:t:b"]).get() }
            try await sub.close().get()  // closing again is fine
        }
    }

    @Test func aLostConnectionFailsPendingSubscriptions() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let redis = try await server.connect()
        let sub = try await subscriber(server, redis, inbox: Inbox())
        // A stopped server takes the commands into its socket buffer but confirms nothing.
        kill(server.processIdentifier, SIGSTOP)
        let first = sub.subscribe(channels: ["P:t:a"])
        let second = sub.psubscribe(patterns: ["P:t:b*"])
        let many = sub.subscribe(channels: (0..<1000).map { "P:t:many:\($0)" })
        try await Task.sleep(for: .milliseconds(100))
        #expect(try await sub.eventLoop.submit { sub.pendingCommands }.get() == 4)
        server.stop()  // SIGKILL: the socket closes with nothing confirmed

        // Closed, or reset (the server died with our commands unread): either way, lost.
        for future in [first, second, many] {
            await #expect {
                try await future.get()
            } throws: { error in
                (error as? RedisConnectionError)?.isConnectionLost == true
            }
        }
        await #expect {
            try await sub.closeFuture.get()
        } throws: { error in
            guard case .connectionLost(let reason) = error as? RedisSubscriptionError else { return false }
            return reason.isConnectionLost
        }
        #expect(try await sub.eventLoop.submit { sub.pendingCommands }.get() == 0)
    }

    @Test func aHealthyConnectionAnswersSeveralProbes() async throws {
        try await withRedis { server, redis in
            let inbox = Inbox()
            let sub = try await subscriber(
                server, redis, inbox: inbox, probeInterval: .milliseconds(200), probeTimeout: .seconds(1))
            try await Task.sleep(for: .seconds(2))
            #expect(try await sub.eventLoop.submit { sub.probesReturned }.get() >= 3)
            #expect(sub.channel.isActive)
            // Probe messages are not handed on: the first message is the one published here.
            try await sub.subscribe(channels: ["P:t:a"]).get()
            _ = try await redis.send("PUBLISH", "P:t:a", "1:e:real").get()
            var messages = inbox.stream.makeAsyncIterator()
            #expect(await messages.next()?.payload == ByteBuffer(string: "1:e:real"))
            try await sub.close().get()
            try await sub.closeFuture.get()
        }
    }

    @Test func aProbeThatNeverComesBackClosesTheConnection() async throws {
        try await withRedis { server, redis in
            let loop = MultiThreadedEventLoopGroup.singleton.next()
            // The publisher "succeeds" without publishing, as a command connection attached to
            // another server would.
            let started = ContinuousClock.now
            let sub = try await subscriber(
                server, redis, inbox: Inbox(), probeInterval: .milliseconds(200), probeTimeout: .milliseconds(300),
                publishProbe: { loop.makeSucceededVoidFuture() })
            let pending = sub.subscribe(channels: ["P:t:a"])
            try await pending.get()
            await #expect(
                throws: RedisSubscriptionError.probeTimedOut(probeChannel: "P:probe:test", probeTimeout: .milliseconds(300))
            ) {
                try await sub.closeFuture.get()
            }
            let elapsed = ContinuousClock.now - started
            // At least interval + timeout; the upper bound leaves room for a loaded test machine.
            #expect(elapsed >= .milliseconds(500) && elapsed < .seconds(3), "closed after \(elapsed)")
            #expect(!sub.channel.isActive)
        }
    }

    @Test func aStoppedServerFailsTheProbe() async throws {
        let server = try RedisTestServer()
        defer { server.stop() }
        let redis = try await server.connect()
        let sub = try await subscriber(
            server, redis, inbox: Inbox(), probeInterval: .milliseconds(200), probeTimeout: .milliseconds(300))
        try await sub.subscribe(channels: ["P:t:a"]).get()
        kill(server.processIdentifier, SIGSTOP)
        defer { kill(server.processIdentifier, SIGCONT) }
        let stopped = ContinuousClock.now
        await #expect {
            try await sub.closeFuture.get()
        } throws: { error in
            guard case .probeTimedOut = error as? RedisSubscriptionError else { return false }
            return true
        }
        let elapsed = ContinuousClock.now - stopped
        #expect(elapsed < .seconds(3), "closed after \(elapsed)")
    }

    @Test func aSubscriberTooSlowForRedisIsCutAndTheCloseIsReported() async throws {
        try await withRedis { server, redis in
            #expect(try await redis.send("CONFIG", "SET", "client-output-buffer-limit", "pubsub 1mb 0 0").get().text == "OK")
            let inbox = Inbox()
            let sub = try await subscriber(server, redis, inbox: inbox)
            try await sub.subscribe(channels: ["P:t:big"]).get()
            // The relay stops reading (a stalled event loop looks the same to Redis).
            try await sub.channel.setOption(ChannelOptions.autoRead, value: false).get()
            let chunk = "1:e:" + String(repeating: "x", count: 64 << 10)
            for _ in 0..<80 {  // 5 MiB
                _ = try await redis.send("PUBLISH", "P:t:big", chunk).get()
            }
            // Redis has cut the subscriber.
            var cut = false
            for _ in 0..<100 where !cut {
                cut = try await pubsubClient(redis) == nil
                if !cut { try await Task.sleep(for: .milliseconds(20)) }
            }
            #expect(cut)

            // Reading again, the relay gets what was in flight, then the close, which is reported.
            // (NIO may have seen the reset already and closed the channel: then this fails.)
            try? await sub.channel.setOption(ChannelOptions.autoRead, value: true).get()
            await #expect {
                try await sub.closeFuture.get()
            } throws: { error in
                guard case .connectionLost = error as? RedisSubscriptionError else { return false }
                return true
            }
            inbox.continuation.finish()
            var received = 0
            for await message in inbox.stream {
                #expect(message.payload.readableBytes == chunk.utf8.count)
                received += 1
            }
            #expect(received < 80)
        }
    }
}

/// The handler alone: the commands it writes, and pushes a real server would not send.
@Suite struct RedisSubscriptionHandlerTests {
    private func makeChannel(
        onMessage: @escaping @Sendable (RedisChannelMessage) -> Void = { _ in }
    ) throws -> (EmbeddedChannel, RedisSubscriptionHandler) {
        let channel = EmbeddedChannel()
        let handler = RedisSubscriptionHandler(
            probeChannel: "P:probe:n", probeInterval: .seconds(30), probeTimeout: .seconds(5),
            maximumChannelsPerCommand: RedisSubscriptionConnection.maximumChannelsPerCommand,
            publishProbe: { fatalError("no probe in these tests") }, onMessage: onMessage,
            closePromise: channel.eventLoop.makePromise(), logger: testLogger)
        try channel.pipeline.syncOperations.addHandlers(ByteToMessageHandler(RESPValueDecoder()), handler)
        try channel.connect(to: SocketAddress(unixDomainSocketPath: "/nowhere")).wait()
        return (channel, handler)
    }

    private func send(
        _ handler: RedisSubscriptionHandler, on channel: EmbeddedChannel, _ kind: RedisSubscriptionHandler.Kind,
        _ names: [String]
    ) -> EventLoopFuture<Void> {
        let promise = channel.eventLoop.makePromise(of: Void.self)
        handler.send(kind, names, promise: promise)
        return promise.futureResult
    }

    /// Every command written so far, decoded.
    private func written(_ channel: EmbeddedChannel) throws -> [[String]] {
        var commands: [[String]] = []
        var decoder = RESPDecoder()
        while var buffer = try channel.readOutbound(as: ByteBuffer.self) {
            while let value = try decoder.decode(buffer: &buffer) {
                guard case .array(let elements?) = value else { throw TestFailure(description: "not a command: \(value)") }
                commands.append(elements.map { $0.text ?? "?" })
            }
        }
        return commands
    }

    private func confirmations(_ kind: String, _ names: some Sequence<String>) -> ByteBuffer {
        var buffer = ByteBuffer()
        for (i, name) in names.enumerated() {
            RESPValue.array([bulk(kind), bulk(name), .integer(Int64(i + 1))]).encode(into: &buffer)
        }
        return buffer
    }

    @Test func twoThousandChannelsAreSentInFourCommands() throws {
        let (channel, handler) = try makeChannel()
        let names = (0..<2000).map { "P:t:\($0)" }
        let done = send(handler, on: channel, .subscribe, names)
        let commands = try written(channel)
        #expect(commands.map(\.count) == [513, 513, 513, 465])
        #expect(commands.allSatisfy { $0.first == "SUBSCRIBE" })
        #expect(Array(commands.map { $0.dropFirst() }.joined()) == names)
        #expect(handler.pendingCommands == 4)

        // Confirmations in pieces: the future waits for the very last one.
        try channel.writeInbound(confirmations("subscribe", names.prefix(1999)))
        #expect(handler.pendingCommands == 1)
        try channel.writeInbound(confirmations("subscribe", names.suffix(1)))
        try done.wait()
        #expect(handler.pendingCommands == 0)

        // 512 exactly is one command; 513 is two.
        _ = send(handler, on: channel, .unsubscribe, Array(names.prefix(512)))
        _ = send(handler, on: channel, .psubscribe, Array(names.prefix(513)))
        #expect(try written(channel).map(\.count) == [513, 513, 2])
        _ = try channel.finish()
    }

    @Test func messagesAreHandedOnAndProbesAreNot() async throws {
        let inbox = Inbox()
        let (channel, _) = try makeChannel { inbox.continuation.yield($0) }
        var bytes = ByteBuffer()
        RESPValue.array([bulk("message"), bulk("P:t:a"), bulk("1:e:x")]).encode(into: &bytes)
        RESPValue.array([bulk("pmessage"), bulk("P:t:*"), bulk("P:t:b"), bulk("2:e:y")]).encode(into: &bytes)
        RESPValue.array([bulk("message"), bulk("P:probe:n"), bulk("probe")]).encode(into: &bytes)
        try channel.writeInbound(bytes)
        inbox.continuation.finish()
        var messages: [RedisChannelMessage] = []
        for await message in inbox.stream { messages.append(message) }
        #expect(messages == [
            RedisChannelMessage(channel: ByteBuffer(string: "P:t:a"), payload: ByteBuffer(string: "1:e:x")),
            RedisChannelMessage(
                channel: ByteBuffer(string: "P:t:b"), pattern: ByteBuffer(string: "P:t:*"), payload: ByteBuffer(string: "2:e:y")),
        ])
        #expect(channel.isActive)
        _ = try channel.finish()
    }

    @Test func anErrorReplyFailsOnlyItsCommand() throws {
        let (channel, handler) = try makeChannel()
        let refused = send(handler, on: channel, .subscribe, ["a", "b"])
        let accepted = send(handler, on: channel, .psubscribe, ["c*"])
        var bytes = ByteBuffer(string: "-NOPERM this user has no permissions to access the 'a' channel\r\n")
        bytes.writeImmutableBuffer(confirmations("psubscribe", ["c*"]))
        try channel.writeInbound(bytes)
        #expect {
            try refused.wait()
        } throws: { error in
            (error as? RedisReplyError)?.code == "NOPERM"
        }
        try accepted.wait()
        #expect(channel.isActive)
        _ = try channel.finish()
    }

    @Test func aConfirmationOfTheWrongKindClosesTheConnection() throws {
        let (channel, handler) = try makeChannel()
        let waiting = send(handler, on: channel, .subscribe, ["a"])
        try channel.writeInbound(confirmations("unsubscribe", ["a"]))
        #expect {
            try waiting.wait()
        } throws: { error in
            guard case .unexpectedReply = error as? RedisConnectionError else { return false }
            return true
        }
        #expect(!channel.isActive)
        channel.embeddedEventLoop.run()  // the pipeline is torn down in a later tick
        #expect {
            try handler.closePromise.futureResult.wait()
        } throws: { error in
            guard case .connectionLost(.unexpectedReply) = error as? RedisSubscriptionError else { return false }
            return true
        }
    }

    @Test(arguments: ["+OK\r\n", ":1\r\n", "*2\r\n$7\r\nmessage\r\n$1\r\na\r\n", "*3\r\n$4\r\npong\r\n$0\r\n\r\n:1\r\n"])
    func aPushNobodyAskedForClosesTheConnection(bytes: String) throws {
        let (channel, handler) = try makeChannel()
        try channel.writeInbound(ByteBuffer(string: bytes))
        #expect(!channel.isActive)
        #expect(throws: RedisConnectionError.self) { try send(handler, on: channel, .subscribe, ["a"]).wait() }
    }

    @Test func closingFailsWhatIsPending() throws {
        let (channel, handler) = try makeChannel()
        let waiting = send(handler, on: channel, .subscribe, (0..<600).map { "c\($0)" })
        try channel.writeInbound(confirmations("subscribe", (0..<300).map { "c\($0)" }))
        try channel.close().wait()
        channel.embeddedEventLoop.run()
        #expect(throws: RedisConnectionError.closed) { try waiting.wait() }
        #expect(handler.pendingCommands == 0)
        #expect(throws: RedisSubscriptionError.connectionLost(.closed)) { try handler.closePromise.futureResult.wait() }
    }
}
