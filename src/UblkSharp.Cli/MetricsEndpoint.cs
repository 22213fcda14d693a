using System.Net;
using System.Net.Sockets;
using System.Text;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Runtime.Metrics;

namespace UblkSharp.Cli;

/// <summary>
/// `--metrics tcp://127.0.0.1:PORT | unix:///PATH`: the daemon's figures for Prometheus, as
/// `GET /metrics` in the text format (<see cref="PrometheusText"/>). A small HTTP/1.1 responder of
/// our own, not prometheus-net: it needs one route, nothing else, and keeps the native (AOT) CLI
/// free of a web stack. Loopback or a unix socket only, unless --metrics-insecure. Served from a
/// background thread (each client on the thread pool, with 5 s to send its request): never a
/// queue thread.
/// </summary>
internal sealed class MetricsEndpoint : IDisposable
{
    private static readonly TimeSpan ClientTimeout = TimeSpan.FromSeconds(5);

    private readonly Socket _listener;
    private readonly Func<string> _source;
    private readonly string? _unixPath;
    private volatile bool _disposed;

    private MetricsEndpoint(Socket listener, Func<string> source, string? unixPath)
    {
        _listener = listener;
        _source = source;
        _unixPath = unixPath;
        new Thread(AcceptLoop) { IsBackground = true, Name = "ublk-metrics" }.Start();
    }

    /// <summary>Where it listens (for a tcp port 0: the port it got).</summary>
    public EndPoint LocalEndPoint => _listener.LocalEndPoint!;

    /// <summary>Checks a --metrics address; bad input or a non-loopback one without <paramref name="insecure"/> throws <see cref="ArgumentException"/>.</summary>
    public static NbdAddress Parse(string text, bool insecure)
    {
        var hostPort = text.StartsWith("tcp://", StringComparison.OrdinalIgnoreCase) ? text[6..].TrimEnd('/') : null;
        if (hostPort is not null && !hostPort[(hostPort.LastIndexOf(']') + 1)..].Contains(':', StringComparison.Ordinal))
        {
            throw new ArgumentException($"bad --metrics address '{text}': give the port, e.g. tcp://127.0.0.1:9560");
        }
        NbdAddress address;
        try
        {
            address = NbdAddress.ParseListen(text);
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException(e.Message.Replace("listen address", "--metrics address", StringComparison.Ordinal), e);
        }
        if (!address.IsUnix && !insecure && !address.IsLoopback)
        {
            throw new ArgumentException($"--metrics {text} would serve the daemon's figures beyond this machine: use a loopback address (127.0.0.1, [::1]) or a unix socket, or add --metrics-insecure");
        }
        return address;
    }

    /// <summary>
    /// Listens at <paramref name="address"/>; throws what binding hit. <paramref name="source"/>
    /// writes the text for each scrape (<see cref="PrometheusText"/>).
    /// </summary>
    public static MetricsEndpoint Start(NbdAddress address, Func<string> source)
    {
        var endPoint = address.ResolveEndPoints()[0];
        var listener = new Socket(endPoint.AddressFamily, SocketType.Stream, address.IsUnix ? ProtocolType.Unspecified : ProtocolType.Tcp);
        try
        {
            if (address.IsUnix)
            {
                // A previous daemon's socket (a crash, or the daemon this one took over from).
                File.Delete(address.SocketPath!);
            }
            else
            {
                // A daemon taking a device over binds while the old one may still listen.
                listener.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            }
            listener.Bind(endPoint);
            if (address.IsUnix && OperatingSystem.IsLinux())
            {
                File.SetUnixFileMode(address.SocketPath!, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            }
            listener.Listen(16);
            return new MetricsEndpoint(listener, source, address.SocketPath);
        }
        catch
        {
            listener.Dispose();
            throw;
        }
    }

    private void AcceptLoop()
    {
        while (!_disposed)
        {
            Socket client;
            try
            {
                client = _listener.Accept();
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                if (_disposed)
                {
                    return;
                }
                Thread.Sleep(10); // EMFILE and the like: do not spin
                continue;
            }
            ThreadPool.UnsafeQueueUserWorkItem(c => Answer(c), client, preferLocal: false);
        }
    }

    private void Answer(Socket client)
    {
        using (client)
        {
            try
            {
                client.ReceiveTimeout = (int)ClientTimeout.TotalMilliseconds;
                client.SendTimeout = (int)ClientTimeout.TotalMilliseconds;
                var request = ReadHead(client);
                var line = request[..Math.Max(0, request.IndexOf('\r', StringComparison.Ordinal))];
                var parts = line.Split(' ');
                string status, body, type = "text/plain; charset=utf-8";
                if (parts.Length != 3 || !parts[2].StartsWith("HTTP/1.", StringComparison.Ordinal))
                {
                    (status, body) = ("400 Bad Request", "bad request\n");
                }
                else if (parts[0] != "GET" && parts[0] != "HEAD")
                {
                    (status, body) = ("405 Method Not Allowed", "only GET\n");
                }
                else if (parts[1] is "/metrics" || parts[1].StartsWith("/metrics?", StringComparison.Ordinal))
                {
                    (status, body, type) = ("200 OK", _source(), PrometheusText.ContentType);
                }
                else
                {
                    (status, body) = ("404 Not Found", "the figures are at /metrics\n");
                }
                var payload = Encoding.UTF8.GetBytes(body);
                var head = $"HTTP/1.1 {status}\r\nContent-Type: {type}\r\nContent-Length: {payload.Length}\r\nConnection: close\r\n\r\n";
                client.Send(Encoding.ASCII.GetBytes(head));
                if (parts.Length > 0 && parts[0] != "HEAD")
                {
                    client.Send(payload);
                }
                client.Shutdown(SocketShutdown.Both);
            }
            catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException)
            {
                // A client that went away or was too slow: nothing to tell it.
            }
        }
    }

    // The request line and headers, up to 8 KiB (the body of a GET is none of our business).
    private static string ReadHead(Socket client)
    {
        var buffer = new byte[8192];
        var n = 0;
        while (n < buffer.Length)
        {
            var got = client.Receive(buffer, n, buffer.Length - n, SocketFlags.None);
            if (got == 0)
            {
                break;
            }
            n += got;
            if (buffer.AsSpan(0, n).IndexOf("\r\n\r\n"u8) >= 0)
            {
                break;
            }
        }
        return Encoding.ASCII.GetString(buffer, 0, n);
    }

    public void Dispose()
    {
        _disposed = true;
        _listener.Dispose();
        if (_unixPath is not null)
        {
            try
            {
                File.Delete(_unixPath);
            }
            catch (IOException)
            {
            }
        }
    }
}
