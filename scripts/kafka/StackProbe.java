/*
 * Readiness probe for the stack's Kafka broker (scripts/stack.sh): a real round trip.
 *
 *   java -cp '<libs>/*:<classes>' StackProbe <bootstrap> <topic> <timeout-seconds>
 *
 * Creates <topic> if it is missing (1 partition, replication factor 1), produces one record
 * with a unique value (acks=all), then consumes it back through a consumer group (so the group
 * coordinator and __consumer_offsets are exercised too) and commits. Retries the whole round
 * trip until it succeeds or the timeout passes. Exit 0 on success, 1 on failure, 2 on bad usage.
 */
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.time.Duration;
import java.util.Collections;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public final class StackProbe {
    private StackProbe() {}

    public static void main(String[] args) throws InterruptedException {
        if (args.length != 3) {
            System.err.println("usage: StackProbe <bootstrap> <topic> <timeout-seconds>");
            System.exit(2);
        }
        String bootstrap = args[0];
        String topic = args[1];
        long start = System.nanoTime();
        long deadline = start + TimeUnit.SECONDS.toNanos(Long.parseLong(args[2]));
        // Started while the broker is still starting: wait for its port first (a client
        // bootstrapping against a closed port only gives up at its request timeout).
        if (!waitForPort(bootstrap, deadline)) {
            System.err.println("kafka probe failed: " + bootstrap + " accepted no connection within "
                    + args[2] + " s");
            System.exit(1);
        }
        Exception last = null;
        int attempt = 0;
        while (System.nanoTime() < deadline) {
            attempt++;
            try {
                String detail = roundTrip(bootstrap, topic, deadline);
                long ms = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - start);
                System.out.println("kafka probe ok: " + detail + " (" + ms + " ms, attempt " + attempt + ")");
                System.exit(0);
            } catch (Exception e) {
                last = e;
                Thread.sleep(500);
            }
        }
        System.err.println("kafka probe failed after " + attempt + " attempt(s): " + describe(last));
        System.exit(1);
    }

    private static boolean waitForPort(String bootstrap, long deadline) throws InterruptedException {
        String hostPort = bootstrap.split(",")[0];
        int colon = hostPort.lastIndexOf(':');
        InetSocketAddress addr = new InetSocketAddress(hostPort.substring(0, colon),
                Integer.parseInt(hostPort.substring(colon + 1)));
        while (System.nanoTime() < deadline) {
            try (Socket socket = new Socket()) {
                socket.connect(addr, 1000);
                return true;
            } catch (IOException e) {
                Thread.sleep(200);
            }
        }
        return false;
    }

    private static String describe(Throwable t) {
        if (t == null) {
            return "timed out before the first attempt";
        }
        if (t instanceof ExecutionException && t.getCause() != null) {
            t = t.getCause();
        }
        return t.getClass().getName() + ": " + t.getMessage();
    }

    private static String ms(long nanos) {
        return TimeUnit.NANOSECONDS.toMillis(nanos) + " ms";
    }

    private static long remainingMs(long deadline) throws java.util.concurrent.TimeoutException {
        long ms = TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime());
        if (ms <= 0) {
            throw new java.util.concurrent.TimeoutException("probe deadline passed");
        }
        return ms;
    }

    private static String roundTrip(String bootstrap, String topic, long deadline) throws Exception {
        int requestTimeout = (int) Math.max(1000, Math.min(10_000, remainingMs(deadline)));

        Properties common = new Properties();
        common.put("bootstrap.servers", bootstrap);
        common.put("client.id", "sink-stack-probe");
        common.put("request.timeout.ms", Integer.toString(requestTimeout));
        common.put("reconnect.backoff.max.ms", "500");

        long t0 = System.nanoTime();
        // 1. the topic
        Properties ap = new Properties();
        ap.putAll(common);
        ap.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, Integer.toString(requestTimeout));
        try (Admin admin = Admin.create(ap)) {
            if (!admin.listTopics().names().get(remainingMs(deadline), TimeUnit.MILLISECONDS).contains(topic)) {
                NewTopic nt = new NewTopic(topic, 1, (short) 1)
                        .configs(Map.of("retention.ms", "3600000"));
                try {
                    admin.createTopics(Collections.singleton(nt)).all()
                            .get(remainingMs(deadline), TimeUnit.MILLISECONDS);
                } catch (ExecutionException e) {
                    if (!(e.getCause() instanceof TopicExistsException)) {
                        throw e;
                    }
                }
            }
        }

        long t1 = System.nanoTime();
        // 2. produce one unique record
        String value = "probe-" + UUID.randomUUID();
        Properties pp = new Properties();
        pp.putAll(common);
        pp.put(ProducerConfig.ACKS_CONFIG, "all");
        pp.put(ProducerConfig.LINGER_MS_CONFIG, "0");
        pp.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, Integer.toString(requestTimeout));
        pp.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, Integer.toString(requestTimeout));
        pp.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        pp.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        RecordMetadata md;
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(pp)) {
            md = producer.send(new ProducerRecord<>(topic, "probe", value))
                    .get(remainingMs(deadline), TimeUnit.MILLISECONDS);
        }

        long t2 = System.nanoTime();
        // 3. consume it back through a fresh consumer group (a fresh one, so that a member of an
        //    earlier probe that was killed cannot hold up the join), commit, then drop the group.
        String group = "sink-stack-probe-" + UUID.randomUUID();
        Properties cp = new Properties();
        cp.putAll(common);
        cp.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        cp.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        cp.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        cp.put(ConsumerConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, Integer.toString(requestTimeout));
        cp.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        cp.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        boolean seen = false;
        try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(cp)) {
            consumer.subscribe(Collections.singletonList(topic));
            while (!seen) {
                long left = remainingMs(deadline);
                ConsumerRecords<String, String> records = consumer.poll(Duration.ofMillis(Math.min(left, 1000)));
                for (ConsumerRecord<String, String> r : records) {
                    if (value.equals(r.value())) {
                        seen = true;
                    }
                }
            }
            consumer.commitSync(Duration.ofMillis(remainingMs(deadline)));
        }
        long t3 = System.nanoTime();
        try (Admin admin = Admin.create(ap)) {
            admin.deleteConsumerGroups(Collections.singleton(group)).all().get(5, TimeUnit.SECONDS);
        } catch (Exception e) {
            // best effort: an empty group also expires on its own
        }
        return "produced and consumed " + topic + "-" + md.partition() + "@" + md.offset()
                + " [topic " + ms(t1 - t0) + ", produce " + ms(t2 - t1) + ", consume " + ms(t3 - t2) + "]";
    }
}
