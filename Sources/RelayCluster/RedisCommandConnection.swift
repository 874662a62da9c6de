// RedisCommandConnection: one pipelined command connection to Redis.
//
// Cluster mode sends every event line through one script call on one
// connection, pipelined, so that lines keep their order; this type is that
// connection. It owns a NIO channel (TCP or Unix socket) with the RESP decoder
// and a RedisCommandHandler, logs in as the endpoint says (AUTH, SELECT), and
// reads the server's run_id, which the sequencing script needs to notice a
// restarted Redis. It does not reconnect: a lost connection fails every waiting
// command, and the caller makes a new one and resends.

import Logging
import NIOCore
import NIOPosix
import RESP

/// A pipelined connection to Redis: commands are answered in the order they were sent.
///
/// Commands may be sent from any thread; sending on ``eventLoop`` avoids a copy and a hop. A reply
/// error fails only its own command (with ``RedisReplyError``); a lost connection fails every
/// command still waiting and every later one (with ``RedisConnectionError``).
public final class RedisCommandConnection: Sendable {
    /// The default bound on commands waiting for replies: 64 times the 64-deep pipeline of the
    /// ingest path, so bursts from many emitters fit, while the replies it stands for stay small.
    public static let defaultMaximumOutstandingCommands = 4096
    /// The default bound on the bytes of commands waiting for replies (64 MiB, `--redis-queue-bytes`).
    public static let defaultMaximumOutstandingBytes = 64 << 20

    /// Where this connection goes.
    public let endpoint: RedisEndpoint
    /// The `run_id` of the Redis server process, from `INFO server` when the connection was made.
    /// It changes when Redis restarts or another server takes over.
    public let runID: String
    /// The event loop of the channel, on which every future of this connection completes.
    public let eventLoop: any EventLoop

    private let channel: any Channel
    private let handler: NIOLoopBound<RedisCommandHandler>

    private init(endpoint: RedisEndpoint, runID: String, channel: any Channel, handler: NIOLoopBound<RedisCommandHandler>) {
        self.endpoint = endpoint
        self.runID = runID
        self.eventLoop = channel.eventLoop
        self.channel = channel
        self.handler = handler
    }

    /// Connects to `endpoint`, logs in (`AUTH`, `SELECT` when the endpoint says so) and reads the
    /// server's `run_id`.
    ///
    /// - Parameters:
    ///   - endpoint: where Redis is.
    ///   - eventLoop: the event loop of the connection.
    ///   - logger: for connection events.
    ///   - maximumOutstandingCommands: how many commands may wait for replies at once; beyond it
    ///     ``send(_:)-(Function)`` fails at once with ``RedisConnectionError/tooManyOutstandingCommands(limit:)``.
    ///   - maximumOutstandingBytes: how many bytes those commands may hold; beyond it, likewise
    ///     with ``RedisConnectionError/tooManyOutstandingBytes(limit:)``.
    ///   - connectTimeout: how long the TCP or Unix socket connect may take.
    /// - Returns: the connection, or a failure: a NIO connect error, ``RedisConnectionError``
    ///   (`handshakeFailed` when `AUTH`, `SELECT` or `INFO` failed; the channel is then closed).
    public static func connect(
        to endpoint: RedisEndpoint,
        on eventLoop: any EventLoop,
        logger: Logger,
        maximumOutstandingCommands: Int = defaultMaximumOutstandingCommands,
        maximumOutstandingBytes: Int = defaultMaximumOutstandingBytes,
        connectTimeout: TimeAmount = .seconds(5)
    ) -> EventLoopFuture<RedisCommandConnection> {
        self.openLoggedInChannel(
            to: endpoint, on: eventLoop, logger: logger,
            maximumOutstandingCommands: maximumOutstandingCommands,
            maximumOutstandingBytes: maximumOutstandingBytes,
            connectTimeout: connectTimeout
        ).map { opened in
            RedisCommandConnection(endpoint: endpoint, runID: opened.runID, channel: opened.channel, handler: opened.handler)
        }
    }

    /// A channel that is connected and logged in, with the RESP decoder and a
    /// ``RedisCommandHandler`` in its pipeline; what both kinds of connection start from.
    struct LoggedInChannel: Sendable {
        var channel: any Channel
        var handler: NIOLoopBound<RedisCommandHandler>
        var runID: String
    }

    /// Connects to `endpoint` and logs in (`AUTH`, `SELECT`, `INFO server`): the part of
    /// ``connect(to:on:logger:maximumOutstandingCommands:maximumOutstandingBytes:connectTimeout:)``
    /// that the subscription connection shares. The future completes on `eventLoop`; on failure
    /// the channel is closed.
    static func openLoggedInChannel(
        to endpoint: RedisEndpoint,
        on eventLoop: any EventLoop,
        logger: Logger,
        maximumOutstandingCommands: Int,
        maximumOutstandingBytes: Int,
        connectTimeout: TimeAmount
    ) -> EventLoopFuture<LoggedInChannel> {
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(connectTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler = RedisCommandHandler(
                        maximumOutstandingCommands: maximumOutstandingCommands,
                        maximumOutstandingBytes: maximumOutstandingBytes,
                        logger: logger)
                    try channel.pipeline.syncOperations.addHandlers(ByteToMessageHandler(RESPValueDecoder()), handler)
                }
            }
        let connected: EventLoopFuture<any Channel>
        switch endpoint.address {
        case .tcp(let host, let port):
            connected = bootstrap.connect(host: host, port: port)
        case .unixSocket(let path):
            connected = bootstrap.connect(unixDomainSocketPath: path)
        }
        return connected.hop(to: eventLoop).flatMap { channel in
            let handler: NIOLoopBound<RedisCommandHandler>
            do {
                handler = NIOLoopBound(
                    try channel.pipeline.syncOperations.handler(type: RedisCommandHandler.self), eventLoop: eventLoop)
            } catch {
                channel.close(promise: nil)
                return eventLoop.makeFailedFuture(error)
            }
            return handshake(endpoint: endpoint, handler: handler, eventLoop: eventLoop)
                .map { runID in
                    logger.debug("connected to Redis", metadata: ["endpoint": "\(endpoint)", "run_id": "\(runID)"])
                    return LoggedInChannel(channel: channel, handler: handler, runID: runID)
                }
                .flatMapErrorWithEventLoop { error, eventLoop in
                    channel.close(promise: nil)
                    return eventLoop.makeFailedFuture(error)
                }
        }
    }

    /// AUTH, SELECT, INFO server; the run_id. Sent pipelined: a failed AUTH fails the rest too.
    private static func handshake(
        endpoint: RedisEndpoint, handler: NIOLoopBound<RedisCommandHandler>, eventLoop: any EventLoop
    ) -> EventLoopFuture<String> {
        func step(_ name: String, _ arguments: [String]) -> EventLoopFuture<RESPValue> {
            let promise = eventLoop.makePromise(of: RESPValue.self)
            handler.value.enqueue(promise: promise) { RESPCommand.encode(arguments, into: &$0) }
            return promise.futureResult.flatMapErrorThrowing { error in
                let reason = (error as? RedisReplyError)?.message ?? "\(error)"
                throw RedisConnectionError.handshakeFailed(step: name, reason: reason)
            }
        }
        var steps: [EventLoopFuture<RESPValue>] = []
        if let password = endpoint.password {
            steps.append(step("AUTH", ["AUTH"] + (endpoint.username.map { [$0] } ?? []) + [password]))
        }
        if endpoint.database != 0 {
            steps.append(step("SELECT \(endpoint.database)", ["SELECT", String(endpoint.database)]))
        }
        let info = step("INFO server", ["INFO", "server"])
        return EventLoopFuture.andAllSucceed(steps, on: eventLoop).flatMap { info }.flatMapThrowing { reply in
            guard case .bulkString(let text?) = reply, let runID = parseRunID(info: String(buffer: text)) else {
                throw RedisConnectionError.handshakeFailed(step: "INFO server", reason: "no run_id in the reply")
            }
            return runID
        }
    }

    /// The `run_id` field of an `INFO` reply.
    static func parseRunID(info: String) -> String? {
        for line in info.split(whereSeparator: { $0 == "\r\n" || $0 == "\n" || $0 == "\r" }) {
            if line.hasPrefix("run_id:") {
                let value = line.dropFirst("run_id:".count)
                return value.isEmpty ? nil : String(value)
            }
        }
        return nil
    }

    /// Sends one command, which `build` encodes (with `RESPCommand.encode`), and returns its reply.
    ///
    /// `build` must write exactly one command. On ``eventLoop`` it writes straight into the
    /// connection's outbound buffer; elsewhere it writes into a buffer that is then handed over.
    /// Commands are written at the end of the event-loop tick, all those of one tick together.
    ///
    /// - Returns: the reply; or a failure: ``RedisReplyError`` for an error reply (the connection
    ///   goes on), ``RedisConnectionError`` when the connection is lost or a bound is reached.
    public func send(_ build: (inout ByteBuffer) -> Void) -> EventLoopFuture<RESPValue> {
        let promise = self.eventLoop.makePromise(of: RESPValue.self)
        if self.eventLoop.inEventLoop {
            self.handler.value.enqueue(promise: promise, build: build)
        } else {
            var buffer = self.channel.allocator.buffer(capacity: 256)
            build(&buffer)
            let handler = self.handler
            let command = buffer
            self.eventLoop.execute {
                handler.value.enqueue(promise: promise) { $0.writeImmutableBuffer(command) }
            }
        }
        return promise.futureResult
    }

    /// Sends the command whose name and arguments are `arguments`, e.g. `send("GET", "key")`.
    public func send(_ arguments: String...) -> EventLoopFuture<RESPValue> {
        self.send { RESPCommand.encode(arguments, into: &$0) }
    }

    /// Commands waiting for their replies. Call on ``eventLoop``.
    public var outstandingCommands: Int {
        self.handler.value.outstandingCommands
    }

    /// Completes when the connection has closed, for whatever reason.
    public var closeFuture: EventLoopFuture<Void> { self.channel.closeFuture }

    /// Closes the connection; commands still waiting fail with ``RedisConnectionError/closed``.
    public func close() -> EventLoopFuture<Void> {
        self.channel.close().flatMapError { error in
            // Already closed is what was asked for.
            if let error = error as? ChannelError, error == .alreadyClosed {
                return self.eventLoop.makeSucceededFuture(())
            }
            return self.eventLoop.makeFailedFuture(error)
        }
    }
}
