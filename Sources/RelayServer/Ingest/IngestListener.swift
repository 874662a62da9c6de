// IngestListener: the Unix socket emitters connect to, and their connections.
//
// The relay accepts ingest connections itself (see Acceptor) rather than
// through NIO's ServerBootstrap, because shutdown must shut down only the
// reading side of each emitter connection with `shutdown(fd, SHUT_RD)` and
// then read what was already written: NIO's `close(mode: .input)` stops
// reading at once and would drop those lines. So each descriptor's number is
// kept, with its channel, for that shutdown.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// The process that wrote to an ingest connection, from `SO_PEERCRED`.
struct PeerCredentials: Sendable, CustomStringConvertible {
    var pid: Int32
    var uid: UInt32

    var description: String { "pid \(pid) uid \(uid)" }
}

public enum IngestSocketError: Error, CustomStringConvertible {
    case pathTooLong(String)
    case inUse(String)
    case notASocket(String)
    /// The socket file answers with an error other than "nobody listens": it may be live and
    /// another user's, so it is left alone.
    case cannotProbe(String, Int32)
    case system(String, String, Int32)

    public var description: String {
        switch self {
        case .pathTooLong(let path):
            return "--socket \(path): path is too long for a Unix socket (at most 107 bytes)"
        case .inUse(let path): return "--socket \(path): another process is already listening there (is a relay running?)"
        case .notASocket(let path): return "--socket \(path): exists and is not a socket; refusing to replace it"
        case .cannotProbe(let path, let code):
            return "--socket \(path): in use by someone else or not reachable (\(String(cString: strerror(code)))); refusing to replace it"
        case .system(let call, let path, let code):
            if call == "bind", code == ENOENT {
                return "--socket \(path): the directory \((path as NSString).deletingLastPathComponent) does not exist"
            }
            return "--socket \(path): \(call) failed: \(String(cString: strerror(code)))"
        }
    }
}

final class IngestListener: Sendable {
    let path: String?
    /// Device and inode of the socket file this process bound: at shutdown the file is removed
    /// only if it is still that one (another relay may have replaced it meanwhile).
    private let boundFile: (device: UInt64, inode: UInt64)?
    private let acceptor: Acceptor
    private let connections = NIOLockedValueBox<[ObjectIdentifier: (descriptor: CInt, channel: any Channel)]>([:])

    private init(descriptor: CInt, path: String?) throws {
        self.path = path
        if let path {
            var status = stat()
            boundFile = stat(path, &status) == 0 ? (UInt64(status.st_dev), UInt64(status.st_ino)) : nil
        } else {
            boundFile = nil
        }
        acceptor = try Acceptor(descriptor: descriptor, name: "ingest-accept")
    }

    /// Binds `path`, replacing a stale socket file but never a live one, another user's, or a non-socket.
    static func bind(path: String, mode: UInt32) throws -> IngestListener {
        guard let address = UnixAddress(path) else { throw IngestSocketError.pathTooLong(path) }

        var status = stat()
        if lstat(path, &status) == 0 {
            guard (status.st_mode & S_IFMT) == S_IFSOCK else { throw IngestSocketError.notASocket(path) }
            switch probe(address) {
            case .live: throw IngestSocketError.inUse(path)
            case .unknown(let code): throw IngestSocketError.cannotProbe(path, code)
            case .stale:
                guard unlink(path) == 0 || errno == ENOENT else {
                    throw IngestSocketError.system("removing the stale socket file: unlink", path, errno)
                }
            }
        }

        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IngestSocketError.system("socket", path, errno) }
        let bound = address.withSocketAddress { Glibc.bind(fd, $0, $1) }
        guard bound == 0 else {
            let code = errno
            close(fd)
            throw IngestSocketError.system("bind", path, code)
        }
        guard chmod(path, mode_t(mode)) == 0, listen(fd, 4096) == 0 else {
            let code = errno
            close(fd)
            unlink(path)
            throw IngestSocketError.system("listen", path, code)
        }
        return try IngestListener(descriptor: fd, path: path)
    }

    /// Uses a listening socket handed over by systemd; it is never closed or unlinked here.
    static func adopt(descriptor: CInt) throws -> IngestListener {
        try IngestListener(descriptor: descriptor, path: nil)
    }

    private enum Probe { case live, stale, unknown(Int32) }

    /// Only "connection refused" (nobody listens) and "no such file" mean stale. Anything else,
    /// permission denied above all, may be another user's live relay.
    private static func probe(_ address: UnixAddress) -> Probe {
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard probe >= 0 else { return .unknown(errno) }
        defer { close(probe) }
        if address.withSocketAddress({ connect(probe, $0, $1) }) == 0 { return .live }
        switch errno {
        case ECONNREFUSED, ENOENT: return .stale
        case let code: return .unknown(code)
        }
    }

    // MARK: Accepting

    /// Starts accepting; `configure` sets up each accepted connection's pipeline.
    func start(
        group: any EventLoopGroup, logger: Logger,
        configure: @escaping @Sendable (any Channel, PeerCredentials) -> EventLoopFuture<Void>
    ) {
        // A bound socket is closed at shutdown, so what waits in its backlog is accepted and
        // drained first; an adopted one stays open and keeps its backlog for the next process.
        acceptor.start(logger: logger, acceptingPendingOnStop: path != nil) { [self] connection in
            let credentials = Self.credentials(of: connection)
            return ClientBootstrap(group: group)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .channelOption(.maxMessagesPerRead, value: 16)
                .channelOption(
                    .recvAllocator,
                    value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 16 * 1024, maximum: 256 * 1024)
                )
                .channelInitializer { channel in configure(channel, credentials) }
                .withConnectedSocket(connection)
                .map { channel in
                    self.track(channel, descriptor: connection)
                }
                .recover { error in
                    logger.warning("could not serve an emitter connection", metadata: ["error": "\(error)"])
                }
        }
    }

    /// `struct ucred` from <sys/socket.h>, which Glibc's module leaves out (it needs _GNU_SOURCE).
    private struct UCred {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
    }

    private static let peerCredentialsOption: Int32 = 17  // SO_PEERCRED on Linux

    private static func credentials(of fd: CInt) -> PeerCredentials {
        var credentials = UCred()
        var length = socklen_t(MemoryLayout<UCred>.size)
        guard getsockopt(fd, SOL_SOCKET, peerCredentialsOption, &credentials, &length) == 0 else {
            return PeerCredentials(pid: -1, uid: UInt32.max)
        }
        return PeerCredentials(pid: credentials.pid, uid: credentials.uid)
    }

    private func track(_ channel: any Channel, descriptor: CInt) {
        let key = ObjectIdentifier(channel)
        connections.withLockedValue { $0[key] = (descriptor, channel) }
        channel.closeFuture.whenComplete { [connections] _ in
            _ = connections.withLockedValue { $0.removeValue(forKey: key) }
        }
        // The channel may have closed before it was tracked.
        if !channel.isActive {
            _ = connections.withLockedValue { $0.removeValue(forKey: key) }
        }
    }

    // MARK: Stopping

    /// Stops accepting. A bound socket is closed and unlinked; an adopted one stays open for the next process.
    func stopAccepting() {
        // The path goes first, so new emitters fail to connect (and keep their lines) rather than
        // land in a backlog about to be closed.
        if let path {
            var status = stat()
            if let boundFile, stat(path, &status) == 0, UInt64(status.st_dev) == boundFile.device,
                UInt64(status.st_ino) == boundFile.inode
            {
                unlink(path)
            }
        }
        acceptor.stop()
        if path != nil { close(acceptor.descriptor) }
    }

    /// Closes the emitter connections still open after the drain.
    func closeConnections() -> [EventLoopFuture<Void>] {
        connections.withLockedValue { Array($0.values) }.map { entry in
            entry.channel.close(promise: nil)
            return entry.channel.closeFuture
        }
    }

    /// Shuts down the reading side of every emitter connection: their writers' next writes fail
    /// (so they resend elsewhere), and NIO still reads every byte written before, then end-of-file.
    /// The future completes when every emitter connection is closed.
    func drainConnections() -> [EventLoopFuture<Void>] {
        let live = connections.withLockedValue { Array($0.values) }
        return live.map { entry in
            let channel = entry.channel
            channel.eventLoop.execute {
                // On the channel's loop, an active channel still owns its descriptor.
                if channel.isActive { _ = shutdown(entry.descriptor, Int32(SHUT_RD)) }
            }
            return channel.closeFuture
        }
    }
}
