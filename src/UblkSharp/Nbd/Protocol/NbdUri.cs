namespace UblkSharp.Nbd.Protocol;

/// <summary>
/// An NBD URI as the NBD URI spec (and libnbd, qemu) write them: <c>nbd://HOST[:PORT]/[EXPORT]</c>
/// or <c>nbd+unix:///[EXPORT]?socket=PATH</c>, and with TLS <c>nbds://</c> and <c>nbds+unix://</c>
/// (x509, with <c>?tls-certificates=DIR</c> as libnbd takes it, or the certificates given apart).
/// </summary>
public sealed class NbdUri
{
    private const string Usage = "use nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH (nbds:// and nbds+unix:// for TLS)";

    private NbdUri(string text, NbdAddress address, string exportName, bool tls = false, string? tlsCertificates = null, string? tlsHostname = null,
        string? tlsPskFile = null, string? tlsUsername = null)
    {
        TlsPskFile = tlsPskFile;
        TlsUsername = tlsUsername;
        Text = text;
        Address = address;
        ExportName = exportName;
        IsTls = tls;
        TlsCertificates = tlsCertificates;
        TlsHostname = tlsHostname;
    }

    public string Text { get; }

    public NbdAddress Address { get; }

    public string ExportName { get; }

    /// <summary>nbds: the connection must switch to TLS (NBD_OPT_STARTTLS) before anything else, or fail.</summary>
    public bool IsTls { get; }

    /// <summary>The URI's <c>tls-certificates</c>: the client's x509 directory (see <see cref="NbdClientTlsOptions.Load"/>), or null.</summary>
    public string? TlsCertificates { get; }

    /// <summary>
    /// The name the server's certificate must carry: the URI's <c>tls-hostname</c>, else its host;
    /// null for a Unix socket without <c>tls-hostname</c> (then only the certificate's chain is checked).
    /// </summary>
    public string? TlsHostname { get; }

    /// <summary>The URI's <c>tls-psk-file</c>: TLS-PSK with a key from this psktool file, or null.</summary>
    public string? TlsPskFile { get; }

    /// <summary>The PSK identity: the URI's user (<c>nbds://alice@HOST/</c>) or <c>tls-username</c>, or null.</summary>
    public string? TlsUsername { get; }

    public static NbdUri Tcp(string host, int port, string exportName = "", bool tls = false)
        => new($"nbd{(tls ? "s" : "")}://{(host.Contains(':', StringComparison.Ordinal) ? $"[{host}]" : host)}:{port}/{Uri.EscapeDataString(exportName)}", NbdAddress.Tcp(host, port), exportName, tls, null, tls ? host : null);

    public static NbdUri Unix(string socketPath, string exportName = "", bool tls = false)
        => new($"nbd{(tls ? "s" : "")}+unix:///{Uri.EscapeDataString(exportName)}?socket={socketPath}", NbdAddress.Unix(socketPath), exportName, tls);

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
        if (scheme is not ("nbd" or "nbd+unix" or "nbds" or "nbds+unix"))
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
        string? certificates = null;
        string? hostname = null;
        string? pskFile = null;
        string? username = null;
        var tls = scheme.StartsWith("nbds", StringComparison.Ordinal);
        foreach (var pair in query.Split('&', StringSplitOptions.RemoveEmptyEntries))
        {
            var eq = pair.IndexOf('=', StringComparison.Ordinal);
            var key = eq < 0 ? pair : pair[..eq];
            var value = eq < 0 ? "" : Uri.UnescapeDataString(pair[(eq + 1)..]);
            if (key == "socket")
            {
                socket = value;
            }
            else if (key == "tls-certificates" && tls)
            {
                certificates = value;
            }
            else if (key == "tls-hostname" && tls)
            {
                hostname = value;
            }
            else if (key == "tls-psk-file" && tls)
            {
                pskFile = value;
            }
            else if (key == "tls-username" && tls)
            {
                username = value;
            }
            else if (key == "tls-verify-peer" && tls && value is "false" or "0" or "no" or "off")
            {
                throw new ArgumentException($"bad NBD URI '{text}': the server's certificate is always verified (TLS that does not know whom it talks to is refused)");
            }
            else if (key is not ("tls-certificates" or "tls-psk-file" or "tls-verify-peer" or "tls-hostname" or "tls-username"))
            {
                throw new ArgumentException($"bad NBD URI '{text}': unknown query parameter '{key}'");
            }
        }
        var at = authority.LastIndexOf('@');
        if (at >= 0)
        {
            // A user name (alice@HOST) names a TLS-PSK identity, as libnbd and qemu take it.
            if (!tls)
            {
                throw new ArgumentException($"bad NBD URI '{text}': a user name (USER@) is a TLS-PSK identity, for nbds:// and nbds+unix:// URIs");
            }
            username ??= Uri.UnescapeDataString(authority[..at]);
            authority = authority[(at + 1)..];
            if (username.Length == 0 || username.Contains(':', StringComparison.Ordinal))
            {
                throw new ArgumentException($"bad NBD URI '{text}': the user name before '@' must be a PSK username (no password, no ':')");
            }
        }
        if (certificates is not null && pskFile is not null)
        {
            throw new ArgumentException($"bad NBD URI '{text}': tls-certificates (x509) and tls-psk-file (PSK) exclude each other");
        }
        if (scheme.EndsWith("+unix", StringComparison.Ordinal))
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
            return new NbdUri(text, NbdAddress.Unix(socket), export, tls, certificates, hostname, pskFile, username);
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
        return new NbdUri(text, NbdAddress.Tcp(host, port ?? NbdProtocol.DefaultPort), export, tls, certificates, tls ? hostname ?? host : null, pskFile, username);
    }

    public override string ToString() => Text;
}
