// Test support: a redis-server of each test's own, and a blocking subscriber.
//
// Every test starts its own server in a temporary directory (Unix socket, or
// TCP on 127.0.0.1 and a free port), with no persistence, and kills it with
// SIGKILL at the end: the server inherits the test runner's signal mask, in
// which SIGTERM is blocked, so Process.terminate() would not stop it. A small
// shell watcher kills the server too if the test process dies first (a crash,
// a timeout), so that no redis-server outlives the tests.
//
// The subscriber is a plain blocking socket with the RESP decoder, independent
// of the connection under test: pub/sub pushes are not command replies, and a
// FIFO connection would rightly refuse them.

import Foundation
import Logging
import NIOCore
import NIOPosix
import RESP
import RelayCluster
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The redis-server executable, if one is installed.
let redisServerPath: String? = {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
    let directories = ["/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"] + path.split(separator: ":").map(String.init)
    return directories.map { $0 + "/redis-server" }.first { FileManager.default.isExecutableFile(atPath: $0) }
}()

struct TestFailure: Error, CustomStringConvertible {
    var description: String
}

let testLogger = Logger(label: "RelayClusterTests")

/// A redis-server of the test's own, with no persistence.
final class RedisTestServer {
    enum Transport {
        case unixSocket
        case tcp
    }

    let directory: URL
    let endpoint: RedisEndpoint
    /// The Unix socket path (also present when serving TCP, so that the subscriber can use it).
    let socketPath: String
    private let process = Process()
    private let watcher = Process()
    private var stopped = false

    /// Starts a server and waits until it accepts connections.
    init(transport: Transport = .unixSocket, extraArguments: [String] = []) throws {
        guard let executable = redisServerPath else { throw TestFailure(description: "redis-server is not installed") }
        self.directory = URL(fileURLWithPath: "/tmp")
            .appendingPathComponent("relay-cluster-tests-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: self.directory, withIntermediateDirectories: true)
        self.socketPath = self.directory.appendingPathComponent("r.sock").path
        var arguments = [
            "--unixsocket", self.socketPath, "--save", "", "--appendonly", "no",
            "--dir", self.directory.path, "--logfile", self.directory.appendingPathComponent("redis.log").path,
        ]
        switch transport {
        case .unixSocket:
            arguments += ["--port", "0"]
            self.endpoint = RedisEndpoint(address: .unixSocket(path: self.socketPath))
        case .tcp:
            let port = try freeTCPPort()
            arguments += ["--port", String(port), "--bind", "127.0.0.1"]
            self.endpoint = RedisEndpoint(address: .tcp(host: "127.0.0.1", port: port))
        }
        self.process.executableURL = URL(fileURLWithPath: executable)
        self.process.arguments = arguments + extraArguments
        self.process.standardOutput = FileHandle.nullDevice
        self.process.standardError = FileHandle.nullDevice
        try self.process.run()

        // Kills the server if this test process goes away without stopping it.
        self.watcher.executableURL = URL(fileURLWithPath: "/bin/sh")
        self.watcher.arguments = [
            "-c", "while kill -0 \(getpid()) 2>/dev/null; do sleep 0.5; done; kill -9 \(self.process.processIdentifier)",
        ]
        self.watcher.standardOutput = FileHandle.nullDevice
        self.watcher.standardError = FileHandle.nullDevice
        try? self.watcher.run()

        // Ready when the socket accepts a connection (a few milliseconds; allow 10 s).
        for _ in 0..<200 {
            if let probe = try? BlockingRedisClient(path: self.socketPath) {
                _ = probe
                return
            }
            usleep(50_000)
        }
        self.stop()
        throw TestFailure(description: "redis-server did not open \(self.socketPath) within 10 s")
    }

    deinit {
        self.stop()
    }

    /// The server's process id (for `kill -STOP` / `-CONT` in tests).
    var processIdentifier: Int32 { self.process.processIdentifier }

    /// Kills the server (SIGKILL) and waits for it; idempotent.
    func stop() {
        guard !self.stopped else { return }
        self.stopped = true
        if self.process.isRunning {
            kill(self.process.processIdentifier, SIGKILL)
            self.process.waitUntilExit()
        }
        if self.watcher.isRunning {
            kill(self.watcher.processIdentifier, SIGKILL)
            self.watcher.waitUntilExit()
        }
        try? FileManager.default.removeItem(at: self.directory)
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

/// A TCP port on 127.0.0.1 that was free a moment ago.
func freeTCPPort() throws -> Int {
    #if canImport(Glibc)
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    #else
    let fd = socket(AF_INET, SOCK_STREAM, 0)
    #endif
    guard fd >= 0 else { throw TestFailure(description: "socket: errno \(errno)") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Int32 in
            guard bind(fd, pointer, length) == 0 else { return -1 }
            return getsockname(fd, pointer, &length)
        }
    }
    guard bound == 0 else { throw TestFailure(description: "bind: errno \(errno)") }
    return Int(UInt16(bigEndian: address.sin_port))
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
