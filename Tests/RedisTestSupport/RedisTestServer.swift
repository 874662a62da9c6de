// Test support shared by the test targets that talk to a real Redis
// (RESPTests, RelayClusterTests): a redis-server of each test's own.
//
// Every test starts its own server in a temporary directory (Unix socket, or
// TCP on 127.0.0.1 and a free port), with no persistence, and kills it with
// SIGKILL at the end: the server inherits the test runner's signal mask, in
// which SIGTERM is blocked, so Process.terminate() would not stop it. A small
// shell watcher kills the server too if the test process dies first (a crash,
// a timeout), so that no redis-server outlives the tests.
//
// Foundation and the C library only, so that any test target can use it; the
// clients (RESP over a blocking socket, RelayCluster's connections) stay with
// the tests that use them.

import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The redis-server executable, if one is installed (in /usr/bin, /usr/local/bin,
/// /opt/homebrew/bin or on the PATH).
public let redisServerPath: String? = {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
    let directories = ["/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"] + path.split(separator: ":").map(String.init)
    return directories.map { $0 + "/redis-server" }.first { FileManager.default.isExecutableFile(atPath: $0) }
}()

/// Why a test server could not be started.
public struct RedisTestServerError: Error, CustomStringConvertible {
    public var description: String
}

/// A redis-server of the test's own, with no persistence.
public final class RedisTestServer {
    public enum Transport {
        case unixSocket
        case tcp
    }

    /// The server's temporary directory (its socket and log), removed by ``stop()``.
    public let directory: URL
    /// The Unix socket path (also present when serving TCP).
    public let socketPath: String
    /// The port on 127.0.0.1 when serving TCP; nil otherwise.
    public let tcpPort: Int?
    private let process = Process()
    private let watcher = Process()
    private var stopped = false

    /// Starts a server and waits until it accepts connections.
    ///
    /// - Parameters:
    ///   - transport: a Unix socket only, or TCP on 127.0.0.1 as well.
    ///   - extraArguments: more redis-server arguments (`--requirepass`, ...).
    ///   - directoryPrefix: the name of the temporary directory, before a random suffix.
    public init(
        transport: Transport = .unixSocket, extraArguments: [String] = [], directoryPrefix: String = "redis-tests"
    ) throws {
        guard let executable = redisServerPath else {
            throw RedisTestServerError(description: "redis-server is not installed")
        }
        // Under /tmp rather than NSTemporaryDirectory(): a Unix socket path must be short.
        self.directory = URL(fileURLWithPath: "/tmp")
            .appendingPathComponent("\(directoryPrefix)-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: self.directory, withIntermediateDirectories: true)
        self.socketPath = self.directory.appendingPathComponent("r.sock").path
        var arguments = [
            "--unixsocket", self.socketPath, "--save", "", "--appendonly", "no",
            "--dir", self.directory.path, "--logfile", self.directory.appendingPathComponent("redis.log").path,
        ]
        switch transport {
        case .unixSocket:
            arguments += ["--port", "0"]
            self.tcpPort = nil
        case .tcp:
            let port = try freeTCPPort()
            arguments += ["--port", String(port), "--bind", "127.0.0.1"]
            self.tcpPort = port
        }
        self.process.executableURL = URL(fileURLWithPath: executable)
        self.process.arguments = arguments + extraArguments
        self.process.standardOutput = FileHandle.nullDevice
        self.process.standardError = FileHandle.nullDevice
        do {
            try self.process.run()
        } catch {
            try? FileManager.default.removeItem(at: self.directory)
            throw error
        }

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
            if unixSocketAcceptsConnections(self.socketPath) { return }
            usleep(50_000)
        }
        self.stop()
        throw RedisTestServerError(description: "redis-server did not open \(self.socketPath) within 10 s")
    }

    deinit {
        self.stop()
    }

    /// The server's process id (for `kill -STOP` / `-CONT` in tests).
    public var processIdentifier: Int32 { self.process.processIdentifier }

    /// Kills the server (SIGKILL) and waits for it, then removes its directory; idempotent.
    public func stop() {
        guard !self.stopped else { return }
        self.stopped = true
        // SIGKILL, not terminate(): SIGTERM is blocked in the mask the server inherited, and it
        // holds nothing worth a clean shutdown.
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
}

/// Whether a connection to the Unix socket at `path` is accepted (it is closed at once).
public func unixSocketAcceptsConnections(_ path: String) -> Bool {
    #if canImport(Glibc)
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    #else
    let fd = socket(AF_UNIX, SOCK_STREAM, 0)
    #endif
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let pathBytes = Array(path.utf8)
    guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        raw.copyBytes(from: pathBytes)
        raw[pathBytes.count] = 0
    }
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
    }
    return connected == 0
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
public func freeTCPPort() throws -> Int {
    #if canImport(Glibc)
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    #else
    let fd = socket(AF_INET, SOCK_STREAM, 0)
    #endif
    guard fd >= 0 else { throw RedisTestServerError(description: "socket: errno \(errno)") }
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
    guard bound == 0 else { throw RedisTestServerError(description: "bind: errno \(errno)") }
    return Int(UInt16(bigEndian: address.sin_port))
}
