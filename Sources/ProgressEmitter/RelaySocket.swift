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
public struct RelaySocketError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let path: String
    public let code: Int32

    public var description: String {
        "cannot \(operation) \(path): \(String(cString: strerror(code)))"
    }
}

/// One connection to the ingest socket. Not thread-safe: one owner at a time.
public final class RelaySocket {
    public let path: String
    private var descriptor: Int32

    /// The socket `progress-relay` listens on unless told otherwise: `PROGRESS_RELAY_SOCKET`, else `/run/progress.sock`.
    public static var defaultPath: String {
        ProcessInfo.processInfo.environment["PROGRESS_RELAY_SOCKET"].flatMap { $0.isEmpty ? nil : $0 } ?? "/run/progress.sock"
    }

    /// Connects to `path`.
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
        // A relay that went away must fail the write, not kill the worker.
        signal(SIGPIPE, SIG_IGN)
    }

    deinit {
        if descriptor >= 0 { close(descriptor) }
    }

    /// Writes all of `bytes`; throws when the relay is gone (the caller resends the whole line elsewhere).
    public func write(_ bytes: some Collection<UInt8>) throws {
        let array = Array(bytes)
        let (_, error) = array.withUnsafeBytes { write(raw: $0) }
        if let error { throw error }
    }

    /// Writes as much of `bytes` as the relay takes; returns how many bytes were written and,
    /// when not all, why. Lines wholly inside the written part are delivered; the rest must be resent.
    func write(raw bytes: UnsafeRawBufferPointer) -> (written: Int, error: RelaySocketError?) {
        var offset = 0
        while offset < bytes.count {
            let written = send(descriptor, bytes.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL))
            if written < 0 {
                if errno == EINTR { continue }
                return (offset, RelaySocketError(operation: "write to", path: path, code: errno))
            }
            offset += written
        }
        return (offset, nil)
    }

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

    /// Tells the relay nothing more will be written; its answers can still be read.
    public func finishWriting() {
        _ = shutdown(descriptor, Int32(SHUT_WR))
    }

    /// Reads until the relay closes the connection.
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
