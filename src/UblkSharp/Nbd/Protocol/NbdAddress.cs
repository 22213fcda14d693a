using System.Globalization;
using System.Net;
using System.Net.Sockets;

namespace UblkSharp.Nbd.Protocol;

/// <summary>
/// Where an NBD server listens or a client connects: a TCP host and port, or a Unix socket path.
/// The listen syntax is <c>tcp://HOST:PORT</c> (port 0: any free one) or <c>unix:///PATH</c>.
/// </summary>
public sealed class NbdAddress
{
    private NbdAddress(string? host, int port, string? socketPath)
    {
        Host = host;
        Port = port;
        SocketPath = socketPath;
    }

    /// <summary>The TCP host (an IP literal or a name), or null for a Unix socket.</summary>
    public string? Host { get; }

    public int Port { get; }

    /// <summary>The Unix socket path, or null for TCP.</summary>
    public string? SocketPath { get; }

    public bool IsUnix => SocketPath is not null;

    /// <summary>A TCP address on this machine's loopback (127.0.0.0/8, ::1, localhost): reachable from here only.</summary>
    public bool IsLoopback => SocketPath is null &&
        (Host!.Equals("localhost", StringComparison.OrdinalIgnoreCase) || (IPAddress.TryParse(Host, out var ip) && IPAddress.IsLoopback(ip)));

    public static NbdAddress Tcp(string host, int port)
    {
        ArgumentException.ThrowIfNullOrEmpty(host);
        ArgumentOutOfRangeException.ThrowIfNegative(port);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(port, 65535);
        return new NbdAddress(host, port, null);
    }

    public static NbdAddress Unix(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        return new NbdAddress(null, 0, path);
    }

    /// <summary>
    /// Parses a listen address. Bad input throws <see cref="ArgumentException"/> with a message for
    /// the person who typed it.
    /// </summary>
    public static NbdAddress ParseListen(string text)
    {
        const string usage = "use tcp://HOST:PORT (e.g. tcp://127.0.0.1:10809) or unix:///PATH";
        ArgumentNullException.ThrowIfNull(text);
        if (text.StartsWith("unix://", StringComparison.OrdinalIgnoreCase))
        {
            var path = Uri.UnescapeDataString(text["unix://".Length..]);
            if (!path.StartsWith('/') || path.Length < 2 || path.EndsWith('/'))
            {
                throw new ArgumentException($"bad listen address '{text}': a Unix socket needs an absolute path, e.g. unix:///run/disk.sock");
            }
            CheckUnixPathLength(path, text);
            return Unix(path);
        }
        if (text.StartsWith("tcp://", StringComparison.OrdinalIgnoreCase))
        {
            var (host, port) = SplitHostPort(text["tcp://".Length..], text, usage);
            if (host is "*" or "")
            {
                host = "0.0.0.0";
            }
            if (!IPAddress.TryParse(host, out _) && !host.Equals("localhost", StringComparison.OrdinalIgnoreCase))
            {
                throw new ArgumentException($"bad listen address '{text}': '{host}' is not an IP address; give one (e.g. 127.0.0.1 or [::1]) or localhost");
            }
            return Tcp(host, port ?? NbdProtocol.DefaultPort);
        }
        throw new ArgumentException($"bad listen address '{text}': {usage}");
    }

    /// <summary>Splits "HOST[:PORT]" or "[V6]:PORT"; the port must be 0-65535.</summary>
    internal static (string Host, int? Port) SplitHostPort(string hostPort, string whole, string usage, string what = "bad listen address")
    {
        string host;
        string? portText = null;
        if (hostPort.StartsWith('['))
        {
            var close = hostPort.IndexOf(']', StringComparison.Ordinal);
            if (close < 0)
            {
                throw new ArgumentException($"{what} '{whole}': unclosed '[' in an IPv6 address");
            }
            host = hostPort[1..close];
            var rest = hostPort[(close + 1)..];
            if (rest.Length > 0)
            {
                if (rest[0] != ':')
                {
                    throw new ArgumentException($"{what} '{whole}': {usage}");
                }
                portText = rest[1..];
            }
        }
        else
        {
            var colon = hostPort.LastIndexOf(':');
            if (colon >= 0 && hostPort.IndexOf(':', StringComparison.Ordinal) != colon)
            {
                throw new ArgumentException($"{what} '{whole}': put an IPv6 address in brackets, e.g. [::1]");
            }
            host = colon < 0 ? hostPort : hostPort[..colon];
            portText = colon < 0 ? null : hostPort[(colon + 1)..];
        }
        if (host.Contains('/', StringComparison.Ordinal) || host.Contains('?', StringComparison.Ordinal))
        {
            throw new ArgumentException($"{what} '{whole}': {usage}");
        }
        int? port = null;
        if (portText is not null)
        {
            if (!int.TryParse(portText, NumberStyles.None, CultureInfo.InvariantCulture, out var p) || p > 65535)
            {
                throw new ArgumentException($"{what} '{whole}': the port must be a number from 0 to 65535, not '{portText}'");
            }
            port = p;
        }
        return (host, port);
    }

    internal static void CheckUnixPathLength(string path, string whole, string what = "bad listen address")
    {
        // sun_path is 108 bytes including the terminating NUL.
        if (System.Text.Encoding.UTF8.GetByteCount(path) > 107)
        {
            throw new ArgumentException($"{what} '{whole}': a Unix socket path must be at most 107 bytes");
        }
    }

    /// <summary>The endpoints to bind or connect to (a host name may resolve to several).</summary>
    public IReadOnlyList<EndPoint> ResolveEndPoints()
    {
        if (SocketPath is not null)
        {
            return [new UnixDomainSocketEndPoint(SocketPath)];
        }
        if (IPAddress.TryParse(Host, out var ip))
        {
            return [new IPEndPoint(ip, Port)];
        }
        if (Host!.Equals("localhost", StringComparison.OrdinalIgnoreCase))
        {
            return [new IPEndPoint(IPAddress.Loopback, Port), new IPEndPoint(IPAddress.IPv6Loopback, Port)];
        }
        return [.. Dns.GetHostAddresses(Host).Select(a => (EndPoint)new IPEndPoint(a, Port))];
    }

    public override string ToString()
    {
        if (SocketPath is not null)
        {
            return "unix://" + SocketPath;
        }
        var host = Host!.Contains(':', StringComparison.Ordinal) ? $"[{Host}]" : Host;
        return string.Create(CultureInfo.InvariantCulture, $"tcp://{host}:{Port}");
    }

    internal static NbdAddress FromEndPoint(EndPoint endPoint) => endPoint switch
    {
        IPEndPoint ip => Tcp(ip.Address.ToString(), ip.Port),
        UnixDomainSocketEndPoint unix => Unix(unix.ToString()),
        _ => throw new ArgumentException($"not an NBD endpoint: {endPoint}"),
    };
}
