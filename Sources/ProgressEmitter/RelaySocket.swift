// RelaySocket: a plain blocking connection to the relay's ingest socket.
//
// The building block of every Swift emitter: connect, write whole lines,
// read the relay's answers. Foundation and the C library only, so any Swift
// worker can link it without the server stack.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// Why talking to the relay failed, with the C library's word for it.
///
/// Thrown by ``RelaySocket``'s initializer, ``RelaySocket/write(_:)`` and ``RelaySocket/readToEnd()``.
public struct RelaySocketError: Error, CustomStringConvertible, Sendable {
    /// What was being done, as the message says it: "connect to", "write to", "read from".
    public let operation: String
    /// The socket's path.
    public let path: String
    /// The `errno` value: `ENOENT` or `ECONNREFUSED` when no relay listens there, `EACCES` when this
    /// user may not connect, `EPIPE` when the relay closed the connection.
    public let code: Int32

    /// "cannot connect to /run/progress.sock: No such file or directory".
    public var description: String {
        "cannot \(operation) \(path): \(String(cString: strerror(code)))"
    }
}

/// One blocking connection to the relay's ingest socket: write NDJSON lines, read the relay's answers.
///
/// The building block under ``ProgressEmitter``, for a tool that sends a batch of lines and wants
/// to know at once whether the relay took them (as `progress-relay emit` does): write the lines,
/// ``finishWriting()``, then ``readToEnd()`` returns one answer line per refused line. A worker
/// that must never wait for the relay wants ``ProgressEmitter`` instead. Not thread-safe: one
/// owner at a time.
public final class RelaySocket {
    /// The socket's path.
    public let path: String
    private var descriptor: Int32

    /// `progress-relay serve`'s default socket (its `RelayConfiguration.defaultSocketPath`): a copy,
    /// because this library must not link the server.
    private static let relayDefaultPath = "/run/progress.sock"

    /// The socket `progress-relay` listens on unless told otherwise: `PROGRESS_RELAY_SOCKET`, else `/run/progress.sock`.
    public static var defaultPath: String {
        ProcessInfo.processInfo.environment["PROGRESS_RELAY_SOCKET"].flatMap { $0.isEmpty ? nil : $0 } ?? relayDefaultPath
    }

    /// Connects to the relay's ingest socket at `path`.
    ///
    /// - Throws: ``RelaySocketError`` when the path is too long for a Unix socket (`ENAMETOOLONG`),
    ///   or when no relay listens there or this user may not connect.
    public init(path: String = RelaySocket.defaultPath) throws {
        self.path = path
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard path.utf8.count < capacity else { throw RelaySocketError(operation: "connect to", path: path, code: ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: path.utf8)
            raw[path.utf8.count] = 0
        }
        #if canImport(Glibc)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #else
        let fd = socket(AF_UNIX, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { throw RelaySocketError(operation: "open a socket for", path: path, code: errno) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        #if canImport(Darwin)
        // Darwin: the socket itself is told not to raise SIGPIPE (as NIO does there), so `send`
        // needs no MSG_NOSIGNAL.
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, socklen_t(MemoryLayout<Int32>.size))
        #endif
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard result == 0 else {
            let code = errno
            close(fd)
            throw RelaySocketError(operation: "connect to", path: path, code: code)
        }
        descriptor = fd
    }

    deinit {
        if descriptor >= 0 { close(descriptor) }
    }

    /// Writes all of `bytes`, waiting while the relay's socket buffer is full.
    ///
    /// Write whole lines: the relay publishes a line when its newline arrives and drops a line cut
    /// by a closed connection.
    ///
    /// - Throws: ``RelaySocketError`` when the relay is gone; lines not wholly written must be
    ///   sent again, whole, on a new connection.
    public func write(_ bytes: some Collection<UInt8>) throws {
        let array = Array(bytes)
        let (_, error) = array.withUnsafeBytes { write(raw: $0) }
        if let error { throw error }
    }

    /// Writes as much of `bytes` as the relay takes; returns how many bytes were written and,
    /// when not all, why. Lines wholly inside the written part are delivered; the rest must be resent.
    /// The one place this library writes to the socket: a relay that went away fails the write
    /// with EPIPE and raises no SIGPIPE (`MSG_NOSIGNAL`; `SO_NOSIGPIPE` on Darwin), so the host
    /// process's signal disposition is left as the host set it.
    func write(raw bytes: UnsafeRawBufferPointer) -> (written: Int, error: RelaySocketError?) {
        var offset = 0
        while offset < bytes.count {
            let written = send(descriptor, bytes.baseAddress! + offset, bytes.count - offset, Self.noSignal)
            if written < 0 {
                if errno == EINTR { continue }
                return (offset, RelaySocketError(operation: "write to", path: path, code: errno))
            }
            offset += written
        }
        return (offset, nil)
    }

    #if canImport(Darwin)
    private static let noSignal: Int32 = 0
    #else
    private static let noSignal = Int32(MSG_NOSIGNAL)
    #endif

    /// The relay's answers that have arrived, without waiting for more.
    func readAvailable() -> [UInt8] {
        var result = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress!, $0.count, Int32(MSG_DONTWAIT)) }
            if count <= 0 { return result }
            result.append(contentsOf: chunk[0..<count])
        }
    }

    /// Tells the relay nothing more will be written (a half close); its answers can still be read.
    public func finishWriting() {
        _ = shutdown(descriptor, Int32(SHUT_WR))
    }

    /// Reads until the relay closes the connection: after ``finishWriting()``, once it has
    /// answered every line.
    ///
    /// - Returns: The relay's answers, one line for each refused line (nothing when all were taken).
    /// - Throws: ``RelaySocketError`` when reading fails.
    public func readToEnd() throws -> [UInt8] {
        var result = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress!, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw RelaySocketError(operation: "read from", path: path, code: errno)
            }
            if count == 0 { return result }
            result.append(contentsOf: chunk[0..<count])
        }
    }
}
