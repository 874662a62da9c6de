// KeyFiles: reading `--jwt-secret-file` and `--jwt-public-key-file`, with the
// reason a file cannot be read (missing, permission, a directory) in the one
// line the user sees.

#if canImport(Glibc)
import Glibc
#endif

enum KeyFile {
    /// The whole file, or a usage error naming the flag and why it cannot be read.
    static func read(_ path: String, flag: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CLIError.usage("\(flag) \(path): cannot read the file: \(reason(errno))") }
        defer { close(fd) }
        var status = stat()
        if fstat(fd, &status) == 0, (status.st_mode & S_IFMT) == S_IFDIR {
            throw CLIError.usage("\(flag) \(path): is a directory, not a key file")
        }
        var bytes = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw CLIError.usage("\(flag) \(path): cannot read the file: \(reason(errno))")
            }
            if count == 0 { return bytes }
            bytes += chunk[..<count]
            // Keys are small; a huge file is a wrong path (a log, a device).
            if bytes.count > 1 << 20 { throw CLIError.usage("\(flag) \(path): larger than 1 MiB, not a key file") }
        }
    }

    private static func reason(_ code: Int32) -> String {
        switch code {
        case ENOENT: return "no such file"
        case EACCES: return "permission denied (the relay runs as uid \(getuid()))"
        default: return String(cString: strerror(code))
        }
    }
}

enum SecretFile {
    /// The file's bytes with one trailing newline removed.
    static func read(_ path: String, flag: String) throws -> [UInt8] {
        var bytes = try KeyFile.read(path, flag: flag)
        if bytes.last == UInt8(ascii: "\n") { bytes.removeLast() }
        if bytes.last == UInt8(ascii: "\r") { bytes.removeLast() }
        guard !bytes.isEmpty else { throw CLIError.usage("\(flag) \(path): the file is empty") }
        return bytes
    }
}
