// SocketActivation: listening sockets handed over by systemd (sd_listen_fds(3)).
//
// With socket activation the ingest socket belongs to systemd and outlives
// the relay: while the relay restarts, workers' writes wait in the kernel
// instead of failing. Sockets are told apart by what they are, not by their
// names: the AF_UNIX stream socket is the ingest, an AF_INET/AF_INET6 one
// the HTTP listener.

#if canImport(Glibc)
import Glibc
#endif
import Foundation

public struct SocketActivation: Sendable, Equatable {
    public var ingestDescriptor: CInt?
    public var httpDescriptor: CInt?

    /// The sockets systemd passed to this process, or nil when it passed none.
    /// The `LISTEN_*` variables are removed so that no child takes them for its own.
    public static func fromEnvironment() throws -> SocketActivation? {
        let environment = ProcessInfo.processInfo.environment
        defer {
            unsetenv("LISTEN_PID")
            unsetenv("LISTEN_FDS")
            unsetenv("LISTEN_FDNAMES")
        }
        guard let count = environment["LISTEN_FDS"].flatMap(Int.init), count > 0 else { return nil }
        if let pid = environment["LISTEN_PID"].flatMap(Int32.init), pid != getpid() { return nil }
        var activation = SocketActivation()
        for descriptor in CInt(3)..<CInt(3 + count) {
            SystemCalls.setCloseOnExec(descriptor)
            guard option(descriptor, SO_ACCEPTCONN) == 1, option(descriptor, SO_TYPE) == Int32(SOCK_STREAM.rawValue)
            else { throw SocketActivationError.notAListeningStream(descriptor) }
            switch option(descriptor, SO_DOMAIN) {
            case AF_UNIX where activation.ingestDescriptor == nil:
                activation.ingestDescriptor = descriptor
            case AF_INET, AF_INET6:
                if activation.httpDescriptor == nil { activation.httpDescriptor = descriptor }
            default:
                throw SocketActivationError.unexpected(descriptor)
            }
        }
        return activation
    }

    private static func option(_ descriptor: CInt, _ name: CInt) -> CInt? {
        try? SystemCalls.getsockopt(descriptor, SOL_SOCKET, name)
    }
}

public enum SocketActivationError: Error, CustomStringConvertible {
    case notAListeningStream(CInt)
    case unexpected(CInt)

    public var description: String {
        switch self {
        case .notAListeningStream(let fd): return "LISTEN_FDS: descriptor \(fd) is not a listening stream socket"
        case .unexpected(let fd): return "LISTEN_FDS: descriptor \(fd) is neither the ingest (AF_UNIX) nor the HTTP (AF_INET/AF_INET6) socket"
        }
    }
}
