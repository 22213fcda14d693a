using System.Net.Sockets;
using System.Text;
using UblkSharp.Cli.Logging;
using UblkSharp.Runtime;

namespace UblkSharp.Cli;

/// <summary>
/// The daemon's side of `ublksharp stats`: a unix socket, /run/ublksharp/ID.stats, in the state
/// directory only its owner may enter (0700), the socket itself 0600. Each connection gets the
/// device's figures as one line of JSON (<see cref="Runtime.Metrics.DeviceStats.ToJson"/>) and is
/// closed. Served from its own background thread: a queue thread never sees it.
/// </summary>
internal sealed class StatsEndpoint : IDisposable
{
    private readonly Socket _listener;
    private readonly string _path;
    private readonly Thread _thread;
    private volatile bool _disposed;

    public static string PathFor(uint id) => Path.Combine(DeviceRecord.Directory, $"{id}.stats");

    private StatsEndpoint(UblkDevice device, string path, Socket listener)
    {
        _path = path;
        _listener = listener;
        _thread = new Thread(() => Serve(device)) { IsBackground = true, Name = "ublk-stats" };
        _thread.Start();
    }

    /// <summary>Starts serving device's figures; null (with a line on stderr) if the socket cannot be made.</summary>
    public static StatsEndpoint? Start(UblkDevice device)
    {
        var path = PathFor(device.Id);
        try
        {
            StateDirectory.Ensure(DeviceRecord.Directory);
            // A previous daemon's (a crash, or the one this one took over from): its listener, if
            // it lives, keeps the old inode and is never reached again.
            File.Delete(path);
            var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                listener.Bind(new UnixDomainSocketEndPoint(path));
                if (OperatingSystem.IsLinux())
                {
                    File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
                }
                listener.Listen(16);
            }
            catch
            {
                listener.Dispose();
                throw;
            }
            return new StatsEndpoint(device, path, listener);
        }
        catch (Exception e) when (e is SocketException or IOException or UnauthorizedAccessException)
        {
            // Figures are a convenience: the device serves without them.
            CliLog.Warning($"device {device.Id}: no live figures ({path}: {e.Message})");
            return null;
        }
    }

    private void Serve(UblkDevice device)
    {
        while (!_disposed)
        {
            try
            {
                using var client = _listener.Accept();
                client.SendTimeout = 2000;
                client.Send(Encoding.UTF8.GetBytes(device.Stats().ToJson() + "\n"));
                client.Shutdown(SocketShutdown.Both);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                if (_disposed)
                {
                    return;
                }
            }
        }
    }

    public void Dispose()
    {
        _disposed = true;
        _listener.Dispose();
        try
        {
            // Disposed only when the device stops: a daemon that hands its device over exits
            // without this, leaving the path to the next one (which binds it anew).
            File.Delete(_path);
        }
        catch (IOException)
        {
        }
    }

    /// <summary>The figures device <paramref name="id"/>'s daemon gives; null if no daemon answers.</summary>
    public static Runtime.Metrics.DeviceStats? Query(uint id, TimeSpan timeout)
    {
        var path = PathFor(id);
        if (!File.Exists(path))
        {
            return null;
        }
        using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { ReceiveTimeout = (int)timeout.TotalMilliseconds, SendTimeout = (int)timeout.TotalMilliseconds };
        try
        {
            s.Connect(new UnixDomainSocketEndPoint(path));
            using var stream = new NetworkStream(s, ownsSocket: false);
            using var reader = new StreamReader(stream, Encoding.UTF8);
            var line = reader.ReadLine();
            return line is null ? null : Runtime.Metrics.DeviceStats.Parse(line);
        }
        catch (SocketException)
        {
            return null; // a socket left by a daemon that is gone
        }
    }
}
