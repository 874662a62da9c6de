// Test support: the shared redis-server of RedisTestSupport with this
// module's connection to it, and a blocking subscriber.
//
// The server (one per test, SIGKILLed at the end) is RedisTestSupport's
// RedisTestServer; here it gains its RedisEndpoint and a RedisCommandConnection.
//
// The subscriber is a plain blocking socket with the RESP decoder, independent
// of the connection under test: pub/sub pushes are not command replies, and a
// FIFO connection would rightly refuse them.

import Foundation
import Logging
import NIOCore
import NIOPosix
import RESP
import RedisTestSupport
import RelayCluster
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// The shared names, declared in this module so that its test files need no import of their own.
typealias RedisTestServer = RedisTestSupport.RedisTestServer
let redisServerPath = RedisTestSupport.redisServerPath

struct TestFailure: Error, CustomStringConvertible {
    var description: String
}

let testLogger = Logger(label: "RelayClusterTests")

extension RedisTestServer {
    /// Where the server listens: its TCP port if it has one, else its Unix socket.
    var endpoint: RedisEndpoint {
        if let port = self.tcpPort {
            return RedisEndpoint(address: .tcp(host: "127.0.0.1", port: port))
        }
        return RedisEndpoint(address: .unixSocket(path: self.socketPath))
    }

    /// A command connection to this server on the shared event loop group.
    func connect(
        endpoint: RedisEndpoint? = nil,
        maximumOutstandingCommands: Int = RedisCommandConnection.defaultMaximumOutstandingCommands,
        maximumOutstandingBytes: Int = RedisCommandConnection.defaultMaximumOutstandingBytes
    ) async throws -> RedisCommandConnection {
        try await RedisCommandConnection.connect(
            to: endpoint ?? self.endpoint, on: MultiThreadedEventLoopGroup.singleton.next(), logger: testLogger,
            maximumOutstandingCommands: maximumOutstandingCommands,
            maximumOutstandingBytes: maximumOutstandingBytes
        ).get()
    }
}

/// Runs `body` with a fresh Unix-socket server and a connection to it; the server is killed after.
func withRedis<T>(
    extraArguments: [String] = [],
    maximumOutstandingCommands: Int = RedisCommandConnection.defaultMaximumOutstandingCommands,
    _ body: (RedisTestServer, RedisCommandConnection) async throws -> T
) async throws -> T {
    let server = try RedisTestServer(extraArguments: extraArguments)
    defer { server.stop() }
    let connection = try await server.connect(maximumOutstandingCommands: maximumOutstandingCommands)
    defer { _ = connection.close() }
    return try await body(server, connection)
}

/// A blocking client on a Unix socket: encoded commands out, decoded replies in.
final class BlockingRedisClient {
    private let fd: Int32
    private var decoder = RESPDecoder()
    private var received = ByteBuffer()

    init(path: String) throws {
        #if canImport(Glibc)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #else
        let fd = socket(AF_UNIX, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { throw TestFailure(description: "socket: errno \(errno)") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
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
            throw TestFailure(description: "connect \(path): errno \(errno)")
        }
        // A reply that never comes fails the test instead of hanging it.
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        self.fd = fd
    }

    deinit {
        close(self.fd)
    }

    /// Sends one command.
    func send(_ arguments: [any RESPArgument]) throws {
        var buffer = ByteBuffer()
        RESPCommand.encode(arguments, into: &buffer)
        try buffer.withUnsafeReadableBytes { bytes in
            var sent = 0
            while sent < bytes.count {
                #if canImport(Glibc)
                let n = Glibc.send(self.fd, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
                #else
                let n = Darwin.send(self.fd, bytes.baseAddress! + sent, bytes.count - sent, 0)
                #endif
                guard n > 0 else { throw TestFailure(description: "send: errno \(errno)") }
                sent += n
            }
        }
    }

    /// The next reply or push.
    func next() throws -> RESPValue {
        while true {
            if let value = try self.decoder.decode(buffer: &self.received) { return value }
            var n = 0
            self.received.writeWithUnsafeMutableBytes(minimumWritableBytes: 65536) { raw in
                n = recv(self.fd, raw.baseAddress!, raw.count, 0)
                return max(n, 0)
            }
            guard n > 0 else { throw TestFailure(description: "recv returned \(n) (errno \(errno))") }
            self.received.discardReadBytes()
        }
    }

    /// Sends one command and returns its reply.
    func call(_ arguments: any RESPArgument...) throws -> RESPValue {
        try self.send(arguments)
        return try self.next()
    }
}

// MARK: - Value shorthands

func bulk(_ text: String) -> RESPValue { .bulkString(ByteBuffer(string: text)) }

extension RESPValue {
    /// The payload of a bulk or simple string as text.
    var text: String? {
        switch self {
        case .bulkString(let payload?): return String(buffer: payload)
        case .simpleString(let payload): return String(buffer: payload)
        default: return nil
        }
    }

    var integer: Int64? {
        if case .integer(let value) = self { return value }
        return nil
    }
}
