namespace UblkSharp.Nbd.Protocol;

/// <summary>
/// An NBD URI as the NBD URI spec (and libnbd, qemu) write them: <c>nbd://HOST[:PORT]/[EXPORT]</c>
/// or <c>nbd+unix:///[EXPORT]?socket=PATH</c>. TLS (nbds) is not supported.
/// </summary>
public sealed class NbdUri
{
    private const string Usage = "use nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH";

    private NbdUri(string text, NbdAddress address, string exportName)
    {
        Text = text;
        Address = address;
        ExportName = exportName;
    }

    public string Text { get; }

    public NbdAddress Address { get; }

    public string ExportName { get; }

    public static NbdUri Tcp(string host, int port, string exportName = "")
        => new($"nbd://{(host.Contains(':', StringComparison.Ordinal) ? $"[{host}]" : host)}:{port}/{Uri.EscapeDataString(exportName)}", NbdAddress.Tcp(host, port), exportName);

    public static NbdUri Unix(string socketPath, string exportName = "")
        => new($"nbd+unix:///{Uri.EscapeDataString(exportName)}?socket={socketPath}", NbdAddress.Unix(socketPath), exportName);

    /// <summary>Parses a URI; bad input throws <see cref="ArgumentException"/> with a message for the person who typed it.</summary>
    public static NbdUri Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var schemeEnd = text.IndexOf("://", StringComparison.Ordinal);
        if (schemeEnd <= 0)
        {
            throw new ArgumentException($"bad NBD URI '{text}': {Usage}");
        }
        var scheme = text[..schemeEnd].ToLowerInvariant();
        var rest = text[(schemeEnd + 3)..];
        if (scheme is "nbds" or "nbds+unix")
        {
            throw new ArgumentException($"bad NBD URI '{text}': TLS (nbds) is not supported; {Usage}");
        }
        if (scheme is not ("nbd" or "nbd+unix"))
        {
            throw new ArgumentException($"bad NBD URI '{text}': unknown scheme '{scheme}'; {Usage}");
        }
        var query = "";
        var q = rest.IndexOf('?', StringComparison.Ordinal);
        if (q >= 0)
        {
            query = rest[(q + 1)..];
            rest = rest[..q];
        }
        var slash = rest.IndexOf('/', StringComparison.Ordinal);
        var authority = slash < 0 ? rest : rest[..slash];
        var path = slash < 0 ? "" : rest[(slash + 1)..];
        var export = Uri.UnescapeDataString(path);
        if (System.Text.Encoding.UTF8.GetByteCount(export) > NbdProtocol.MaxString)
        {
            throw new ArgumentException($"bad NBD URI '{text}': the export name is longer than {NbdProtocol.MaxString} bytes");
        }
        string? socket = null;
        foreach (var pair in query.Split('&', StringSplitOptions.RemoveEmptyEntries))
        {
            var eq = pair.IndexOf('=', StringComparison.Ordinal);
            var key = eq < 0 ? pair : pair[..eq];
            var value = eq < 0 ? "" : Uri.UnescapeDataString(pair[(eq + 1)..]);
            if (key == "socket")
            {
                socket = value;
            }
            else if (key is not ("tls-certificates" or "tls-psk-file" or "tls-verify-peer"))
            {
                throw new ArgumentException($"bad NBD URI '{text}': unknown query parameter '{key}'");
            }
        }
        if (scheme == "nbd+unix")
        {
            if (authority.Length > 0)
            {
                throw new ArgumentException($"bad NBD URI '{text}': nbd+unix URIs have no host (three slashes: nbd+unix:///EXPORT?socket=PATH)");
            }
            if (string.IsNullOrEmpty(socket))
            {
                throw new ArgumentException($"bad NBD URI '{text}': nbd+unix needs ?socket=PATH");
            }
            NbdAddress.CheckUnixPathLength(socket, text, "bad NBD URI");
            return new NbdUri(text, NbdAddress.Unix(socket), export);
        }
        if (socket is not null)
        {
            throw new ArgumentException($"bad NBD URI '{text}': ?socket= belongs to nbd+unix:// URIs");
        }
        if (authority.Length == 0)
        {
            throw new ArgumentException($"bad NBD URI '{text}': no host; {Usage}");
        }
        var (host, port) = NbdAddress.SplitHostPort(authority, text, Usage, "bad NBD URI");
        if (host.Length == 0)
        {
            throw new ArgumentException($"bad NBD URI '{text}': no host; {Usage}");
        }
        return new NbdUri(text, NbdAddress.Tcp(host, port ?? NbdProtocol.DefaultPort), export);
    }

    public override string ToString() => Text;
}
