<?php
/**
 * The in-site webhook handler of bench/wordpress.sh, installed as a mu-plugin: what WP Fusion
 * does for `update_tags` once it has the tags, and nothing else. It answers on `init`, as WP
 * Fusion's own handler does, after WordPress has loaded: check the access key, find the user by
 * the `{slug}_contact_id` meta, save the tags from the ActiveCampaign payload
 * (`contact[tags]`, comma separated) as `{slug}_tags`, fire `wpf_tags_modified`.
 *
 * WP Fusion would also ask the CRM for the contact's tags first (a few hundred ms more per
 * webhook); the gateway's direct mode skips that call too when the payload carries the tags,
 * so both sides do the same work: this benchmark compares where it runs, not the CRM.
 *
 * Needs WPFGW_BENCH_KEY (the access key) and WPFGW_BENCH_LOG (one line per webhook handled, for
 * the script's count) defined, and WPFGW_SLUG (the CRM slug, `activecampaign`).
 */

add_action(
	'init',
	function () {
		if ( ! isset( $_GET['wpf_action'] ) ) {
			return;
		}
		if ( ! hash_equals( WPFGW_BENCH_KEY, (string) ( $_GET['access_key'] ?? '' ) ) ) {
			wp_send_json( array( 'success' => false, 'error' => 'invalid_access_key' ), 403 );
		}
		$contact = isset( $_POST['contact'] ) && is_array( $_POST['contact'] ) ? $_POST['contact'] : array();
		$id      = (string) ( $_GET['contact_id'] ?? $contact['id'] ?? '' );
		$tags    = array_values(
			array_filter( array_map( 'trim', explode( ',', (string) ( $contact['tags'] ?? '' ) ) ), 'strlen' )
		);
		$users   = get_users(
			array(
				'meta_key'   => WPFGW_SLUG . '_contact_id',
				'meta_value' => $id,
				'fields'     => 'ID',
				'number'     => 1,
			)
		);
		if ( empty( $users ) ) {
			wp_send_json( array( 'success' => false, 'error' => 'no_user' ), 404 );
		}
		$user_id = (int) $users[0];
		update_user_meta( $user_id, WPFGW_SLUG . '_tags', $tags );
		do_action( 'wpf_tags_modified', $user_id, $tags );
		file_put_contents( WPFGW_BENCH_LOG, $id . "\n", FILE_APPEND | LOCK_EX );
		wp_send_json( array( 'success' => true ) );
	},
	1
);
