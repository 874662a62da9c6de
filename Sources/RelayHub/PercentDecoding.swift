// PercentDecoding: `%XX` escapes (RFC 3986 section 2.1), decoded strictly, for every place the
// relay reads them: HTTP query strings and `/topics/{topic}` path segments (RelayServer) and
// the user and password of `--redis` (RelayCluster), which is why it lives in RelayHub.
//
// A malformed escape is an error, never dropped or passed through: `%` without two hex digits
// after it (`%`, `%4`, `%zz`), or escapes whose bytes are not UTF-8 (`%FF`, `%C3` alone). A
// lenient decoder would turn `?topic=a%zzb` into another topic than the client meant.

/// Strict `%XX` decoding.
public enum PercentDecoding {
    /// `text` with its `%XX` escapes decoded; nil when an escape is malformed or the decoded bytes
    /// are not UTF-8.
    ///
    /// - Parameter plusAsSpace: whether `+` stands for a space, as in a query string
    ///   (`application/x-www-form-urlencoded`); elsewhere `+` is itself. `%2B` is always `+`.
    public static func decode(_ text: Substring, plusAsSpace: Bool = false) -> String? {
        let utf8 = text.utf8
        guard utf8.contains(UInt8(ascii: "%")) || (plusAsSpace && utf8.contains(UInt8(ascii: "+"))) else {
            return String(text)
        }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(utf8.count)
        var iterator = utf8.makeIterator()
        while let byte = iterator.next() {
            switch byte {
            case UInt8(ascii: "%"):
                guard let high = iterator.next().flatMap(hexValue), let low = iterator.next().flatMap(hexValue) else {
                    return nil
                }
                bytes.append(high << 4 | low)
            case UInt8(ascii: "+") where plusAsSpace:
                bytes.append(UInt8(ascii: " "))
            default:
                bytes.append(byte)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    /// `decode(_:plusAsSpace:)` for a whole string.
    public static func decode(_ text: String, plusAsSpace: Bool = false) -> String? {
        decode(Substring(text), plusAsSpace: plusAsSpace)
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
